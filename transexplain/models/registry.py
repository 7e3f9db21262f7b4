"""Pick the adapter for a model object by its architecture."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .base import EncoderAdapter
from .vit import SUPPORTED, ViTAdapter


def adapter_classes() -> dict:
    """Every architecture family with its adapter class (for the method x architecture matrix)."""
    from .decoder import DecoderAdapter
    from .swin import SwinAdapter
    from .text import TextAdapter

    return {cls.family: cls for cls in (ViTAdapter, SwinAdapter, TextAdapter, DecoderAdapter)}


def as_adapter(model) -> EncoderAdapter:
    """Return an adapter for `model` (an adapter is returned as is)."""
    if isinstance(model, EncoderAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise UserError(f"Expected a PyTorch model, got {type(model).__name__}: pass a timm or Hugging Face model object.")
    name = type(model).__name__
    from .canonizers import canonize

    view = canonize(model)
    if view is not None:
        model, name = view, type(view).__name__  # a timm-layout view (models/canonizers.py)
    if name in ("VisionTransformer", "VisionTransformerDistilled"):
        return ViTAdapter(model)
    if name == "Eva":  # EVA-02 and timm's other Eva models: rotary embeddings, SwiGLU (models/eva.py)
        from .eva import EvaAdapter

        return EvaAdapter(model)
    if name in ("SwinTransformer", "SwinTransformerV2"):
        from .swin import SwinAdapter

        return SwinAdapter(model)
    if name in ("GPT2LMHeadModel", "LlamaForCausalLM"):  # decoder-only LMs: the next-token logit (models/decoder.py)
        from .decoder import DecoderAdapter

        return DecoderAdapter(model)
    if name.endswith("ForSequenceClassification"):
        from .text import TextAdapter

        return TextAdapter(model)
    raise UserError(f"This model is not supported: {name}. Supported architectures: {SUPPORTED}.")
