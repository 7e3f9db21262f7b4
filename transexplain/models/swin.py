"""Adapter for timm SwinTransformer (v1 and v2): windowed attention, shifted windows, patch merging.

Swin V2 (timm `SwinTransformerV2`) differs in four places, each recorded with the tape's existing
kinds: cosine attention (q and k L2-normalised per head — a pass-through, like LayerNorm's
division — then their product, then the learned per-head logit scale as a pass-through scale),
the continuous position bias (16·sigmoid of a small MLP of the log-spaced relative coordinates: a
constant added to the logits, like v1's table), res-post-norm (`x + norm1(attn(x))`,
`x + norm2(mlp(x))`: the LayerNorm sits on the sublayer's output) and patch merging that
normalises after its reduction. Its q and v biases (k has none) enter one qkv linear whose weight
is the model's own. V2 blocks have no LayerNorm on their input tokens, so `ln_stats` is refused.

The forward is re-run op by op from the model's own submodules through an LRP `Tape`, so the
model object is never modified (the tests check that the recorded logits equal `model(x)`).

Token layout. Blocks are numbered globally 0..num_blocks-1 across the stages. Block b works on
its stage's grid (H_b, W_b), tokens in row-major order, so a row vector over block b's tokens has
shape (B, H_b*W_b). Its attention is stored as (B*nW, heads, n, n): one n x n matrix per window
(n = window area) of the *rolled* grid (shifted blocks roll the grid by -shift before windowing).

`mix(v, b, M)` applies the block-diagonal-after-roll matrix without ever building it:
roll v by -shift, cut it into windows, multiply each window by its own n x n matrix, put the
windows back and roll by +shift. A row vector that still lives on the coarser grid of the next
stage is first sent back through the patch merging: each merged token gives 1/4 of its value to
each of its 2x2 children (mass preserving).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lrp import Tape
from ..lrp.attnlrp import token_stats
from .base import CAPABILITIES, EncoderAdapter, Trace
from .vit import _conv_stem, _refuse, input_channels, record_patch_embedding


def _to_windows(t: torch.Tensor, win: tuple, shift: tuple) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, wh*ww, C): roll by -shift, zero-pad to whole windows, partition."""
    n_batch, hh, ww, ch = t.shape
    if any(shift):
        t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h = (win[0] - hh % win[0]) % win[0]
    pad_w = (win[1] - ww % win[1]) % win[1]
    if pad_h or pad_w:
        t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = hh + pad_h, ww + pad_w
    t = t.reshape(n_batch, hp // win[0], win[0], wp // win[1], win[1], ch).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(-1, win[0] * win[1], ch)


def _from_windows(t: torch.Tensor, win: tuple, shift: tuple, hh: int, ww: int) -> torch.Tensor:
    """Inverse of `_to_windows`: (B*nW, wh*ww, C) -> (B, H, W, C), padding cropped, roll undone."""
    ch = t.shape[-1]
    hp, wp = math.ceil(hh / win[0]) * win[0], math.ceil(ww / win[1]) * win[1]
    t = t.reshape(-1, hp // win[0], wp // win[1], win[0], win[1], ch).permute(0, 1, 3, 2, 4, 5)
    t = t.reshape(-1, hp, wp, ch)[:, :hh, :ww]
    if any(shift):
        t = torch.roll(t, shifts=(shift[0], shift[1]), dims=(1, 2))
    return t


def _merge(t: torch.Tensor) -> torch.Tensor:
    """timm's PatchMerging index op: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C)."""
    n_batch, hh, ww, ch = t.shape
    t = F.pad(t, (0, 0, 0, ww % 2, 0, hh % 2))
    hh, ww = hh + hh % 2, ww + ww % 2
    return t.reshape(n_batch, hh // 2, 2, ww // 2, 2, ch).permute(0, 1, 3, 4, 2, 5).flatten(3)


class _QKVWithBias:
    """Swin V2's qkv projection: the model's bias-free qkv linear (its weight, shared) with the
    concatenated q, k (zero) and v biases, as timm's forward adds them."""

    def __init__(self, attn: nn.Module):
        self.weight = attn.qkv.weight
        self.bias = torch.cat((attn.q_bias, attn.k_bias.to(attn.q_bias.dtype), attn.v_bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _l2_normalise(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1)


def _cpb_bias(attn: nn.Module) -> torch.Tensor:
    """Swin V2's continuous relative position bias, (1, heads, n, n), as timm computes it."""
    n = attn.window_size[0] * attn.window_size[1]
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
    return (16 * torch.sigmoid(bias)).unsqueeze(0)


class SwinAdapter(EncoderAdapter):
    family = "swin"
    description = "Swin models (average-pooled, no class token)"
    #: no class token: the classifier reads the mean of the last stage's tokens
    offers = frozenset(CAPABILITIES) - {"class_token"}
    default_start_layer = 0
    default_row_normalize = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        m = model
        if getattr(m, "global_pool", "avg") != "avg" or type(m.head).__name__ != "ClassifierHead":
            _refuse(f"the Swin pools with {getattr(m, 'global_pool', '?')!r}, not with a global average")
        if getattr(m, "dynamic_img_size", False):
            _refuse("Swin with dynamic image sizes is not handled yet")
        pe = m.patch_embed
        if getattr(pe, "dynamic_img_pad", False):
            _refuse("Swin with a padded patch embedding is not handled yet")
        self.stem = _conv_stem(pe.proj)
        self.patch_size = tuple(pe.patch_size)
        self.input_size = (input_channels(pe.proj, self.stem), pe.img_size[0], pe.img_size[1])
        self.grid = tuple(pe.grid_size)  # stage-1 token grid: the resolution of every token map
        self.blocks = []  # (stage index, block module)
        self.stage_res = []  # token grid of each stage's blocks
        #: Swin V2: cosine attention, continuous position bias, res-post-norm, norm after the merge
        self.v2 = type(m).__name__ == "SwinTransformerV2"
        block_type = "SwinTransformerV2Block" if self.v2 else "SwinTransformerBlock"
        if self.v2:
            self.description = "Swin V2 models (average-pooled, no class token; res-post-norm, no LayerNorm on a block's input)"
            self.offers = frozenset(self.offers) - {"ln_stats"}
        for s, stage in enumerate(m.layers):
            if type(stage.downsample).__name__ not in ("PatchMerging", "Identity"):
                _refuse(f"stage {s} downsamples with {type(stage.downsample).__name__}")
            self.stage_res.append(tuple(stage.output_resolution))
            for blk in stage.blocks:
                if type(blk).__name__ != block_type or getattr(blk, "dynamic_mask", False):
                    _refuse(f"stage {s} has a {type(blk).__name__} block, not a {block_type}")
                if self.v2 and getattr(blk.attn, "qkv_bias_separate", False):
                    _refuse("Swin V2 with a separately added qkv bias is not handled yet")
                if type(blk.mlp).__name__ != "Mlp":
                    _refuse(f"stage {s} has a {type(blk.mlp).__name__} MLP, not a plain two-layer MLP")
                self.blocks.append((s, blk))
        self.block_stage = [s for s, _ in self.blocks]
        self.num_blocks = len(self.blocks)
        self.num_classes = m.num_classes
        self.num_heads = m.layers[0].blocks[0].attn.num_heads
        cfg = getattr(m, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    # -- the recorded forward --------------------------------------------------------------
    def run(self, x: torch.Tensor, record: bool = False, sublayers: bool = False) -> Trace:
        m = self.model
        tape = Tape(record=record)
        sink = [] if sublayers else None  # per block: each sublayer's tokens before/after (used by tokentm)
        pe = m.patch_embed
        h = record_patch_embedding(tape, x, pe.proj, self.stem)
        h = tape.move(lambda t: t.permute(0, 2, 3, 1), h)  # NCHW -> NHWC
        h = tape.passthrough(pe.norm, h)
        ape = getattr(m, "absolute_pos_embed", None)  # Hugging Face Swin's optional absolute embedding (after the norm)
        if ape is not None:
            h = tape.add(h, ape.reshape(1, *self.grid, -1).to(h.dtype))
        attentions, stats = [], []
        hidden = []  # per block: its output tokens (B, H, W, C) (used by legrad)
        inputs = []  # per block: the tokens entering it (B, H, W, C) (used by attcat)
        b = 0
        for stage in m.layers:
            ds = stage.downsample
            if not isinstance(ds, nn.Identity):
                h = tape.move(_merge, h)
                if self.v2:  # V2: reduce, then normalise
                    h = tape.passthrough(ds.norm, tape.linear(h, ds.reduction))
                else:
                    h = tape.passthrough(ds.norm, h)
                    h = tape.linear(h, ds.reduction)
            for blk in stage.blocks:
                stats.append(token_stats(h, blk.norm1.eps))
                inputs.append(h)
                h, att = self._block(tape, blk, h, b, sink)
                attentions.append(att)
                hidden.append(h)
                b += 1
        h = tape.passthrough(m.norm, h)
        h = tape.move(lambda t: t.flatten(1, 2), h)
        pooled = tape.pool_mean(h, 1)
        pooled = tape.passthrough(m.head.drop, pooled)
        logits = tape.linear(pooled, m.head.fc)
        logits = tape.passthrough(m.head.flatten, logits)
        trace = Trace(logits=logits, attentions=attentions, tape=tape, input=x)
        trace.extras["ln_stats"] = stats
        trace.extras["hidden"] = hidden
        trace.extras["block_inputs"] = inputs
        trace.extras["sublayers"] = sink
        return trace

    def _block(self, tape: Tape, blk, x, b: int, sink: list | None = None):
        # Swin V2 differs in four places: cosine attention with a learned logit scale (q and k L2-normalised),
        # the continuous position bias, and each sublayer's norm applied to its output (post-norm)
        v2 = self.v2
        attn = blk.attn
        n_batch, hh, ww, ch = x.shape
        win, shift = tuple(blk.window_size), tuple(blk.shift_size)
        heads = attn.num_heads
        n = win[0] * win[1]
        h = x if v2 else tape.passthrough(blk.norm1, x)
        h = tape.move(lambda t: _to_windows(t, win, shift), h)
        n_win = h.shape[0]
        qkv = tape.linear(h, _QKVWithBias(attn) if v2 and attn.q_bias is not None else attn.qkv)
        head_dim = qkv.shape[-1] // (3 * heads)

        def part(i):
            return lambda t: t.reshape(n_win, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[i]

        if v2:
            q = tape.passthrough(_l2_normalise, tape.move(part(0), qkv))
            k = tape.passthrough(_l2_normalise, tape.move(part(1), qkv))
        else:
            q = tape.passthrough(lambda t: t * attn.scale, tape.move(part(0), qkv))
            k = tape.move(part(1), qkv)
        v = tape.move(part(2), qkv)
        scores = tape.matmul(q, tape.move(lambda t: t.transpose(-2, -1), k), tag=("attn_scores", b))
        if v2:
            logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
            scores = tape.passthrough(lambda t: t * logit_scale, scores)
            scores = tape.add(scores, _cpb_bias(attn).to(scores.dtype))
        else:
            scores = tape.add(scores, attn._get_rel_pos_bias())
        mask = blk.attn_mask
        if mask is not None:  # (nW, n, n), repeated for each image of the batch
            scores = tape.add(scores, mask.to(scores.dtype).unsqueeze(1).repeat(n_batch, 1, 1, 1))
        att = tape.softmax(scores)
        att = tape.passthrough(attn.attn_drop, att)
        out = tape.matmul(att, v, tag=("attn_value", b))
        out = tape.move(lambda t: t.transpose(1, 2).reshape(n_win, n, heads * head_dim), out)
        out = tape.linear(out, attn.proj)
        out = tape.passthrough(attn.proj_drop, out)
        if sink is not None:  # each token as the attention sublayer alone transforms it (value, projection[, norm]), unmixed
            with torch.no_grad():
                alone = attn.proj(_from_windows(v.transpose(1, 2).reshape(n_win, n, heads * head_dim), win, shift, hh, ww))
                alone = blk.norm1(alone) if v2 else alone
            sink.append({"attn_in": x.detach(), "attn_out": alone})
        out = tape.move(lambda t: _from_windows(t, win, shift, hh, ww), out)
        if v2:
            out = tape.passthrough(blk.norm1, out)
        out = tape.passthrough(blk.drop_path1, out)
        x = tape.add(x, out)
        h = x if v2 else tape.passthrough(blk.norm2, x)
        h = tape.linear(h, blk.mlp.fc1)
        h = tape.passthrough(blk.mlp.act, h)
        h = tape.passthrough(blk.mlp.drop1, h)
        h = tape.passthrough(blk.mlp.norm, h)
        h = tape.linear(h, blk.mlp.fc2)
        h = tape.passthrough(blk.mlp.drop2, h)
        if v2:
            h = tape.passthrough(blk.norm2, h)
        h = tape.passthrough(blk.drop_path2, h)
        if sink is not None:
            sink[-1].update(mlp_in=x.detach(), mlp_out=h.detach())
        x = tape.add(x, h)
        return x, att

    # -- token-space operators ---------------------------------------------------------------
    def block_grid(self, block: int) -> tuple:
        return self.stage_res[self.block_stage[block]]

    def readout(self, trace: Trace) -> torch.Tensor:
        n_batch = trace.logits.shape[0]
        gh, gw = self.stage_res[-1]
        return torch.full((n_batch, gh * gw), 1.0 / (gh * gw), dtype=trace.logits.dtype, device=trace.logits.device)

    def unmerge(self, v: torch.Tensor, stage: int) -> torch.Tensor:
        """Row vector on stage `stage`'s grid -> on stage `stage-1`'s grid (each child gets 1/4)."""
        gh, gw = self.stage_res[stage]
        fh, fw = self.stage_res[stage - 1]
        t = v.reshape(v.shape[0], gh, gw) / 4.0
        t = t.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        return t[:, :fh, :fw].reshape(v.shape[0], fh * fw)

    def _stage_of(self, n_tok: int, at_most: int) -> int:
        for s in range(at_most, -1, -1):
            if self.stage_res[s][0] * self.stage_res[s][1] == n_tok:
                return s
        raise ValueError(f"a row of {n_tok} tokens lies on no stage grid up to stage {at_most}")

    def to_grid(self, v: torch.Tensor, stage: int) -> torch.Tensor:
        """Bring a row vector from the grid it lies on (a later stage or `stage`) down to `stage`."""
        gh, gw = self.stage_res[stage]
        if v.shape[1] == gh * gw:
            return v
        s = self._stage_of(v.shape[1], len(self.stage_res) - 1)
        while s > stage:
            v = self.unmerge(v, s)
            s -= 1
        return v

    def mix(self, v, block, mats):
        stage = self.block_stage[block]
        v = self.to_grid(v, stage)
        _, blk = self.blocks[block]
        gh, gw = self.stage_res[stage]
        win, shift = tuple(blk.window_size), tuple(blk.shift_size)
        w = _to_windows(v.reshape(v.shape[0], gh, gw, 1), win, shift)  # (B*nW, n, 1)
        w = torch.bmm(w.transpose(1, 2), mats.to(v.dtype)).transpose(1, 2)
        return _from_windows(w, win, shift, gh, gw).reshape(v.shape[0], gh * gw)

    def layout_tokens(self, w: torch.Tensor, block: int) -> torch.Tensor:
        """A per-token row (B, N_b) on block `block`'s grid -> (B*nW, n), one row per window matrix
        (rolled like the block's windows; padded tokens get 0)."""
        _, blk = self.blocks[block]
        gh, gw = self.block_grid(block)
        win, shift = tuple(blk.window_size), tuple(blk.shift_size)
        return _to_windows(w.reshape(w.shape[0], gh, gw, 1), win, shift).squeeze(-1)

    def content_mean(self, row):
        return row.mean(-1)

    def to_token_map(self, v, batch=None):
        v = self.to_grid(v, 0)
        return v.reshape(v.shape[0], *self.stage_res[0])
