"""Explainer plugins, found by name in a registry (`get_method`, `list_methods`)."""
from . import attcat, attention, attnlrp, baseline, beyond_intuition, captum_methods, gradient, legrad, ln_stats, relevance, tokentm  # noqa: F401  (registers the methods)
from .base import Explainer, Explanation, get_method, list_methods, method_names, normalise_per_sample, upsample

__all__ = ["Explainer", "Explanation", "get_method", "list_methods", "method_names", "normalise_per_sample", "upsample"]
