"""Adapter for timm VisionTransformer (ViT, DeiT) with one class token.

The forward is re-run op by op from the model's own submodules and parameters, so the model object
is never modified; the tests check that the recorded logits equal `model(x)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from ..lrp import Tape
from .base import ClassTokenReadout, EncoderAdapter, Trace

SUPPORTED = "timm VisionTransformer / DeiT with one class token, timm SwinTransformer, Hugging Face BERT-family classifiers"


def _refuse(why: str):
    raise UserError(f"This model is not supported: {why}. Supported architectures: {SUPPORTED}.")


def _conv_stem(proj):
    """None for a single patch-embedding convolution; for a convolutional stem (a Sequential of
    Conv2d, optional BatchNorm2d, optional ReLU, repeated) the list of (conv, bn, relu) triples."""
    if isinstance(proj, nn.Conv2d):
        return None
    if not isinstance(proj, nn.Sequential):
        _refuse(f"the patch embedding is a {type(proj).__name__}, neither a Conv2d nor a Sequential conv stem")
    layers, items = [], list(proj)
    while items:
        conv = items.pop(0)
        if not isinstance(conv, nn.Conv2d):
            _refuse(f"the conv stem holds a {type(conv).__name__} where a Conv2d was expected")
        bn = items.pop(0) if items and isinstance(items[0], nn.BatchNorm2d) else None
        act = items.pop(0) if items and isinstance(items[0], nn.ReLU) else None
        layers.append((conv, bn, act))
    return layers


def input_channels(proj: nn.Module, stem) -> int:
    """Channels of the image a patch embedding takes (its first convolution's input)."""
    return (stem[0][0] if stem else proj).in_channels


def _fold(conv: nn.Conv2d, bn):
    """A Conv2d equal to conv followed by BatchNorm in eval mode (running statistics)."""
    if bn is None:
        return conv
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=conv.groups, bias=True).to(conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded.to(conv.weight.device).requires_grad_(False)


def record_patch_embedding(tape: Tape, x: torch.Tensor, proj: nn.Module, stem) -> torch.Tensor:
    """Record the patch embedding: one input convolution, or a conv stem whose BatchNorms are
    folded into their convolutions and whose ReLUs pass relevance unchanged."""
    if stem is None:
        return tape.conv_input(x, proj)
    h = x
    for i, (conv, bn, act) in enumerate(stem):
        h = (tape.conv_input if i == 0 else tape.conv)(h, _fold(conv, bn))
        if act is not None:
            h = tape.passthrough(act, h)
    return h


class ViTAdapter(ClassTokenReadout, EncoderAdapter):
    family = "vit"
    default_start_layer = 1
    default_row_normalize = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        m = model
        if getattr(m, "cls_token", None) is None:
            _refuse("the ViT has no class token (global average pooling models are not handled yet)")
        if getattr(m, "num_prefix_tokens", 1) != 1 or getattr(m, "reg_token", None) is not None:
            _refuse("the ViT has more than one prefix token (DeiT-distilled or register tokens)")
        if getattr(m, "global_pool", "token") != "token" or getattr(m, "attn_pool", None) is not None:
            _refuse(f"the ViT pools with {getattr(m, 'global_pool', '?')!r}, not with its class token")
        if getattr(m, "no_embed_class", False) or getattr(m, "dynamic_img_size", False):
            _refuse("position embeddings without the class token or dynamic image sizes are not handled yet")
        for i, blk in enumerate(m.blocks):
            attn = getattr(blk, "attn", None)
            if type(blk).__name__ != "Block" or attn is None or not hasattr(attn, "qkv"):
                _refuse(f"block {i} is a {type(blk).__name__}, not a standard pre-norm ViT block")
            if getattr(attn, "gate", None) is not None:
                _refuse("gated attention is not handled yet")
            if not (hasattr(blk.mlp, "fc1") and hasattr(blk.mlp, "fc2")) or type(blk.mlp).__name__ != "Mlp":
                _refuse(f"block {i} has a {type(blk.mlp).__name__} MLP, not a plain two-layer MLP")
        pe = m.patch_embed
        self.stem = _conv_stem(pe.proj)
        self.patch_size = tuple(pe.patch_size)
        self.grid = tuple(pe.grid_size)
        self.input_size = (input_channels(pe.proj, self.stem), self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])
        self.num_blocks = len(m.blocks)
        self.num_classes = m.num_classes
        self.num_heads = m.blocks[0].attn.num_heads
        cfg = getattr(m, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))

    # -- the recorded forward --------------------------------------------------------------
    def run(self, x: torch.Tensor, record: bool = False) -> Trace:
        m = self.model
        tape = Tape(record=record)
        n_batch = x.shape[0]
        h = record_patch_embedding(tape, x, m.patch_embed.proj, self.stem)
        h = tape.move(lambda t: t.flatten(2).transpose(1, 2), h)
        h = tape.passthrough(m.patch_embed.norm, h)
        cls = m.cls_token.expand(n_batch, -1, -1)
        h = tape.move(lambda t: torch.cat([cls, t], dim=1), h)
        h = tape.add(h, m.pos_embed)
        h = tape.passthrough(m.norm_pre, h)
        attentions = []
        ln_stats = []  # per block: (μ_t, σ_t) of norm1's input, (B, N) each (used by ln_stats)
        hidden = []  # per block: its output tokens (B, N, D), before the final norm (used by legrad)
        for b, blk in enumerate(m.blocks):
            with torch.no_grad():
                var, mu = torch.var_mean(h.detach(), dim=-1, unbiased=False)
                ln_stats.append((mu, torch.sqrt(var + getattr(blk.norm1, "eps", 1e-6))))
            h, att = self._block(tape, blk, h, b)
            attentions.append(att)
            hidden.append(h)
        h = tape.passthrough(m.norm, h)
        pooled = tape.move(lambda t: t[:, 0], h)
        pooled = tape.passthrough(m.fc_norm, pooled)
        logits = tape.linear(pooled, m.head)
        return Trace(logits=logits, attentions=attentions, tape=tape, input=x, extras={"ln_stats": ln_stats, "hidden": hidden})

    def _block(self, tape: Tape, blk, x, b: int):
        attn = blk.attn
        n_batch, n_tok, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        h = tape.passthrough(blk.norm1, x)
        qkv = tape.linear(h, attn.qkv)

        def part(i):
            return lambda t: t.reshape(n_batch, n_tok, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[i]

        q = tape.passthrough(attn.q_norm, tape.move(part(0), qkv))
        k = tape.passthrough(attn.k_norm, tape.move(part(1), qkv))
        v = tape.move(part(2), qkv)
        q = tape.passthrough(lambda t: t * attn.scale, q)
        scores = tape.matmul(q, tape.move(lambda t: t.transpose(-2, -1), k), tag=("attn_scores", b))
        att = tape.passthrough(lambda t: t.softmax(dim=-1), scores)
        out = tape.matmul(att, v, tag=("attn_value", b))
        out = tape.move(lambda t: t.transpose(1, 2).reshape(n_batch, n_tok, heads * head_dim), out)
        out = tape.passthrough(attn.norm, out)
        out = tape.linear(out, attn.proj)
        out = tape.passthrough(blk.ls1, out)
        x = tape.add(x, out)
        h = tape.passthrough(blk.norm2, x)
        h = tape.linear(h, blk.mlp.fc1)
        h = tape.passthrough(blk.mlp.act, h)
        h = tape.passthrough(blk.mlp.norm, h)
        h = tape.linear(h, blk.mlp.fc2)
        h = tape.passthrough(blk.ls2, h)
        x = tape.add(x, h)
        return x, att

    # -- token-space operators ---------------------------------------------------------------
    def content_mean(self, row):
        return row[:, 1:].mean(-1)

    def to_token_map(self, v):
        return v[:, 1:].reshape(v.shape[0], *self.grid)
