"""Model adapters and model loading: make a timm / Hugging Face model look like one encoder."""
from .base import EncoderAdapter, Trace
from .registry import as_adapter

__all__ = ["EncoderAdapter", "Trace", "as_adapter"]
