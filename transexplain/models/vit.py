"""Adapter for timm VisionTransformer (ViT, DeiT) with one class token.

The forward is re-run op by op from the model's own submodules and parameters, so the model object
is never modified; the tests check that the recorded logits equal `model(x)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from ..lrp import Tape
from ..lrp.attnlrp import token_stats
from .base import ClassTokenReadout, EncoderAdapter, Trace

SUPPORTED = ("timm VisionTransformer / DeiT / BEiT, timm Eva (EVA-02), timm SwinTransformer (v1, v2), Hugging Face "
             "ViT / DeiT / BEiT / Swin image classifiers, torchvision ViT, Hugging Face BERT-family classifiers")


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


def read_geometry(adapter, m, mean, std):
    """Set a timm ViT-like model's (ViT, EVA) patch geometry, input size, block / class / head counts
    and its normalisation (the pretrained_cfg's, else `mean` and `std`) on `adapter`."""
    pe = m.patch_embed
    adapter.stem = _conv_stem(pe.proj)
    adapter.patch_size = tuple(pe.patch_size)
    adapter.grid = tuple(pe.grid_size)
    adapter.input_size = (input_channels(pe.proj, adapter.stem), adapter.grid[0] * adapter.patch_size[0],
                          adapter.grid[1] * adapter.patch_size[1])
    adapter.num_blocks = len(m.blocks)
    adapter.num_classes = m.num_classes
    adapter.num_heads = m.blocks[0].attn.num_heads
    cfg = getattr(m, "pretrained_cfg", None) or {}
    adapter.mean = tuple(cfg.get("mean", mean))
    adapter.std = tuple(cfg.get("std", std))


class ViTAdapter(ClassTokenReadout, EncoderAdapter):
    family = "vit"
    default_start_layer = 1
    default_row_normalize = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        m = model
        # the tokens in front of the patches, in timm's order: class, distillation (DeiT), registers
        self.prefix_params = [t for t in (getattr(m, "cls_token", None), getattr(m, "dist_token", None),
                                          getattr(m, "reg_token", None)) if t is not None]
        self.prefix = sum(t.shape[1] for t in self.prefix_params)
        if self.prefix != getattr(m, "num_prefix_tokens", self.prefix):
            _refuse(f"the ViT declares {m.num_prefix_tokens} prefix tokens but has {self.prefix}")
        if getattr(m, "attn_pool", None) is not None:
            _refuse("the ViT pools with attention (MAP head), which is not handled yet")
        pool = getattr(m, "global_pool", "token")
        if getattr(m, "dist_token", None) is not None:
            self.pool = "distilled"  # DeiT: the mean of the class head on token 0 and the distillation head on token 1
        elif pool == "token" and getattr(m, "cls_token", None) is not None:
            self.pool = "token"
        elif pool == "avg":
            self.pool = "avg"
        else:
            _refuse(f"the ViT pools with {pool!r}{' without a class token' if pool == 'token' else ''}; "
                    "class-token, average and DeiT-distilled pooling are handled")
        #: the first token the average pools (timm leaves the prefix tokens out unless pool_include_prefix)
        self.pool_from = 0 if getattr(m, "pool_include_prefix", False) else self.prefix
        self.description = {"token": "ViTs with a class token", "avg": "average-pooled ViTs",
                            "distilled": "DeiT-distilled ViTs (class and distillation heads averaged)"}[self.pool]
        if self.pool != "token":  # the classifier does not read one class token's row
            self.offers = frozenset(self.offers) - {"class_token"}
        if getattr(m, "dynamic_img_size", False) or getattr(m, "pos_embed", None) is None:
            _refuse("dynamic image sizes and models without an absolute position embedding are not handled yet")
        for i, blk in enumerate(m.blocks):
            attn = getattr(blk, "attn", None)
            if type(blk).__name__ != "Block" or attn is None or not hasattr(attn, "qkv"):
                _refuse(f"block {i} is a {type(blk).__name__}, not a standard pre-norm ViT block")
            if getattr(attn, "gate", None) is not None:
                _refuse("gated attention is not handled yet")
            if not (hasattr(blk.mlp, "fc1") and hasattr(blk.mlp, "fc2")) or type(blk.mlp).__name__ != "Mlp":
                _refuse(f"block {i} has a {type(blk.mlp).__name__} MLP, not a plain two-layer MLP")
        read_geometry(self, m, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    # -- the recorded forward --------------------------------------------------------------
    def run(self, x: torch.Tensor, record: bool = False, sublayers: bool = False) -> Trace:
        m = self.model
        tape = Tape(record=record)
        sink = [] if sublayers else None  # per block: each sublayer's tokens before/after (used by tokentm)
        n_batch = x.shape[0]
        h = record_patch_embedding(tape, x, m.patch_embed.proj, self.stem)
        h = tape.move(lambda t: t.flatten(2).transpose(1, 2), h)
        h = tape.passthrough(m.patch_embed.norm, h)
        prefix = [t.expand(n_batch, -1, -1) for t in self.prefix_params]
        if getattr(m, "no_embed_class", False):  # position embedding on the patches only, then the prefix
            h = tape.add(h, m.pos_embed)
        if prefix:
            h = tape.move(lambda t: torch.cat([*prefix, t], dim=1), h)
        if not getattr(m, "no_embed_class", False):
            h = tape.add(h, m.pos_embed)
        h = tape.passthrough(m.norm_pre, h)
        attentions = []
        ln_stats = []  # per block: (μ_t, σ_t) of norm1's input, (B, N) each (used by ln_stats)
        hidden = []  # per block: its output tokens (B, N, D), before the final norm (used by legrad)
        inputs = []  # per block: the tokens entering it (B, N, D) (used by bt_t and attcat)
        for b, blk in enumerate(m.blocks):
            ln_stats.append(token_stats(h, getattr(blk.norm1, "eps", 1e-6)))
            inputs.append(h)
            h, att = self._block(tape, blk, h, b, sink)
            attentions.append(att)
            hidden.append(h)
        logits = self._head(tape, h)
        return Trace(logits=logits, attentions=attentions, tape=tape, input=x, extras={"ln_stats": ln_stats, "hidden": hidden,
                                                                              "block_inputs": inputs, "sublayers": sink})

    def _head(self, tape: Tape, h: torch.Tensor) -> torch.Tensor:
        """The final norm, the pooling and the classifier, on the last block's tokens (LeGrad reads
        any layer's tokens through the same head)."""
        m = self.model
        h = tape.passthrough(m.norm, h)
        if self.pool == "distilled":
            a = tape.linear(tape.move(lambda t: t[:, 0], h), m.head)
            d = tape.linear(tape.move(lambda t: t[:, 1], h), m.head_dist)
            return tape.passthrough(lambda t: t / 2, tape.add(a, d))
        if self.pool == "avg":
            pooled = tape.pool_mean(tape.move(lambda t: t[:, self.pool_from:], h), 1)
        else:
            pooled = tape.move(lambda t: t[:, 0], h)
        pooled = tape.passthrough(m.fc_norm, pooled)
        head = m.head
        if hasattr(head, "proj") and hasattr(head, "classes"):  # a CLIP zero-shot head (models/canonizers.py)
            z = tape.passthrough(head.normalise, tape.linear(pooled, head.proj))
            return tape.linear(z, head.classes)
        return tape.linear(pooled, head)

    def _block(self, tape: Tape, blk, x, b: int, sink: list | None = None):
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
        rel_pos = getattr(attn, "rel_pos", None)  # BEiT's relative position bias (models/canonizers.py)
        if rel_pos is not None:
            scores = tape.add(scores, rel_pos().to(scores.dtype))
        att = tape.softmax(scores)
        out = tape.matmul(att, v, tag=("attn_value", b))
        out = tape.move(lambda t: t.transpose(1, 2).reshape(n_batch, n_tok, heads * head_dim), out)
        out = tape.passthrough(attn.norm, out)
        out = tape.linear(out, attn.proj)
        out = tape.passthrough(blk.ls1, out)
        if sink is not None:  # each token as the attention sublayer alone transforms it (value, projection), unmixed
            with torch.no_grad():
                alone = blk.ls1(attn.proj(attn.norm(v.transpose(1, 2).reshape(n_batch, n_tok, heads * head_dim))))
            sink.append({"attn_in": x.detach(), "attn_out": alone})
        x = tape.add(x, out)
        h = tape.passthrough(blk.norm2, x)
        h = tape.linear(h, blk.mlp.fc1)
        h = tape.passthrough(blk.mlp.act, h)
        h = tape.passthrough(blk.mlp.norm, h)
        h = tape.linear(h, blk.mlp.fc2)
        h = tape.passthrough(blk.ls2, h)
        if sink is not None:
            sink[-1].update(mlp_in=x.detach(), mlp_out=h.detach())
        x = tape.add(x, h)
        return x, att

    # -- token-space operators ---------------------------------------------------------------
    def readout(self, trace: Trace) -> torch.Tensor:
        """The row the classifier reads: the class token; for DeiT-distilled the mean of the class
        and distillation tokens' rows (its two heads are averaged); for average pooling the uniform
        row over the pooled tokens."""
        n_batch, n_tok = trace.attentions[-1].shape[0], trace.attentions[-1].shape[-1]
        v = torch.zeros(n_batch, n_tok, dtype=trace.logits.dtype, device=trace.logits.device)
        if self.pool == "distilled":
            v[:, :2] = 0.5
        elif self.pool == "avg":
            v[:, self.pool_from:] = 1.0 / (n_tok - self.pool_from)
        else:
            v[:, 0] = 1.0
        return v

    def content_mean(self, row):
        return row[:, self.prefix:].mean(-1)

    def to_token_map(self, v, batch=None):
        return v[:, self.prefix:].reshape(v.shape[0], *self.grid)
