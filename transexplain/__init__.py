"""transexplain: explain Transformer classifiers and measure how good the explanations are."""
from .api import explain
from .errors import UserError
from .explainers import Explanation, list_methods
from .models import as_adapter

__version__ = "0.1.0"
__all__ = ["explain", "list_methods", "as_adapter", "Explanation", "UserError", "__version__"]
