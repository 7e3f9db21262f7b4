"""Explainer plugins, found by name in a registry (`get_method`, `list_methods`)."""
# the import order is the registry's order (tables, `--method all`): the 2020-2021 methods, then the newer ones
from . import attention, baseline, captum_methods, gradient, legrad, ln_stats, relevance  # noqa: F401,I001  (registers the methods)
from . import attnlrp, beyond_intuition, attcat, tokentm  # noqa: F401,I001
from .base import Explainer, Explanation, get_method, list_methods, method_names, normalise_per_sample, upsample

__all__ = ["Explainer", "Explanation", "get_method", "list_methods", "method_names", "normalise_per_sample", "upsample"]
