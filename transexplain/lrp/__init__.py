"""Layer-wise relevance propagation on a recorded forward: the engine and the rule sets."""
from .core import Propagation, Tape, propagate, safe_divide
from .rules import CLASSIC, OURS, RULE_SETS, RuleSet

__all__ = ["Tape", "propagate", "Propagation", "safe_divide", "RuleSet", "OURS", "CLASSIC", "RULE_SETS"]
