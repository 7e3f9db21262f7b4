"""LRP rules, one small class each, and the two rule sets of the paper (`OURS`, `CLASSIC`).

Every rule ignores biases, as the reference implementation does. The rules get the recorded
inputs of a node and the relevance of its output, and return one relevance per input.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..precision import linear_rule_dtype
from .core import EPS, Node, per_sample_sum, safe_divide, vjp


def _rows_with_relevance(r2: torch.Tensor):
    """Rows of a flattened (rows, features) pair that carry relevance; the rest give exact zeros.

    In the last block only the CLS row carries relevance, so this skips most of its MLP.
    """
    live = (r2 != 0).any(dim=1)
    n_live = int(live.sum())
    if n_live == r2.shape[0]:
        return None
    return live.nonzero(as_tuple=True)[0]


_SPLITS: dict = {}


def split_weight(weight: torch.Tensor, dtype: torch.dtype | None = None):
    """(W⁺, W⁻) of a weight (cast to `dtype` if given), cached while the weight is unchanged (the
    split costs a pass over it)."""
    dtype = dtype or weight.dtype
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
    ident = (id(weight), dtype)
    hit = _SPLITS.get(ident)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2], hit[3]
    w = weight.detach().to(dtype)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    _SPLITS[ident] = (weakref.ref(weight, lambda _ref: _SPLITS.pop(ident, None)), key, wp, wn)
    return wp, wn


class AlphaOneBetaZero:
    """α=1, β=0 for Linear: positive contributions x⁺w⁺ and x⁻w⁻ only.

    shared=True (ours): one denominator Σ(x⁺w⁺ + x⁻w⁻), conservative.
    shared=False (classic): separate denominators for the two parts, as the paper's LRP baselines.
    """

    def __init__(self, shared: bool):
        self.shared = shared

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        r2 = r.reshape(-1, r.shape[-1])
        rows = _rows_with_relevance(r2)
        if rows is not None:
            out = torch.zeros_like(x2)
            if rows.numel():
                out[rows] = self._dense(x2[rows], weight, r2[rows])
            return out.reshape(x.shape)
        return self._dense(x2, weight, r2).reshape(x.shape)

    def _dense(self, x, weight, r):
        # precision "mixed": the products in float32. The denominators are sums of same-signed terms
        # (x⁺w⁺ + x⁻w⁻), so float32 rounding there is not amplified; the ill-conditioned rules
        # (additions, attention products) stay in float64.
        low = linear_rule_dtype() if x.dtype == torch.float64 else None
        if low is not None:
            return self._dense_in(x.to(low), weight, r.to(low), low).to(x.dtype)
        return self._dense_in(x, weight, r, None)

    def _dense_in(self, x, weight, r, dtype):
        wp, wn = split_weight(weight, dtype)
        xp = x.clamp(min=0)
        xn = x - xp
        if self.shared:
            # x⁺w⁺ + x⁻w⁻ >= 0, so the stabiliser never meets a zero denominator except where z == 0
            z = torch.addmm(F.linear(xp, wp), xn, wn.t())
            s = (r / (z + EPS)).masked_fill_(z == 0, 0)
            return (s @ wp).mul_(xp).addcmul_(s @ wn, xn)
        return (safe_divide(r, F.linear(xp, wp)) @ wp).mul_(xp).addcmul_(safe_divide(r, F.linear(xn, wn)) @ wn, xn)


class ConvAlphaOneBetaZero:
    """The α=1, β=0 rule of `AlphaOneBetaZero` for a Conv2d: every output position is a linear
    layer over its receptive field, and the transpose convolution gathers the shares back."""

    def __init__(self, shared: bool):
        self.shared = shared

    def __call__(self, x: torch.Tensor, conv: torch.nn.Conv2d, r: torch.Tensor) -> torch.Tensor:
        wp, wn = split_weight(conv.weight)
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        xp = x.clamp(min=0)
        xn = x - xp

        def back(weight, s):
            return torch.nn.grad.conv2d_input(x.shape, weight, s, **kw)

        zp, zn = F.conv2d(xp, wp, **kw), F.conv2d(xn, wn, **kw)
        if self.shared:
            z = zp + zn
            s = (r / (z + EPS)).masked_fill_(z == 0, 0)
            return xp * back(wp, s) + xn * back(wn, s)
        return xp * back(wp, safe_divide(r, zp)) + xn * back(wn, safe_divide(r, zn))


#: ε of the relative stabiliser (`epsilon="relative"`)
RELATIVE_EPS = 1e-3


def relative_divide(r: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, eps: float = RELATIVE_EPS) -> torch.Tensor:
    """r / (z + ε·sign(z)·scale), 0 where that is 0: `scale` is the sum of the magnitudes that
    cancel into z (|a| + |b|, or |a| @ |b|), so a z that is only rounding noise of large
    operands is damped instead of amplified. Sign(0) counts as +."""
    den = z + torch.where(z >= 0, eps, -eps) * scale
    zero = den == 0
    return (r / torch.where(zero, torch.ones_like(den), den)).masked_fill_(zero, 0)


class AddProportional:
    """z = a + b: each operand gets its share a·R/z, b·R/z.

    rescale=True (ours): then the two shares are rescaled per sample so that they sum to ΣR, each
    branch keeping |ΣR_a| / (|ΣR_a| + |ΣR_b|) of it. The reference sums over the whole batch;
    summing per sample is what makes a sample's map independent of its batch.
    relative=True: the stabiliser is ε·(|a| + |b|) (see `relative_divide`) instead of 1e-9.
    """

    def __init__(self, rescale: bool, relative: bool = False):
        self.rescale = rescale
        self.relative = relative

    def __call__(self, a, b, r):
        s = relative_divide(r, a + b, a.abs() + b.abs()) if self.relative else safe_divide(r, a + b)
        ra, rb = a * s, b * s
        if not self.rescale:
            return ra, rb
        sa, sb, total = per_sample_sum(ra), per_sample_sum(rb), per_sample_sum(r)
        denom = sa.abs() + sb.abs()
        ra = ra * safe_divide(safe_divide(sa.abs(), denom) * total, sa)
        rb = rb * safe_divide(safe_divide(sb.abs(), denom) * total, sb)
        return ra, rb


class BilinearHalved:
    """z = a @ b with both operands inputs (Q·Kᵀ, A·V): gradient × input on each, then halved.

    relative=True: the stabiliser is ε·(|a| @ |b|) (see `relative_divide`) instead of 1e-9."""

    def __init__(self, relative: bool = False):
        self.relative = relative

    def __call__(self, a, b, r):
        s = relative_divide(r, a @ b, a.abs() @ b.abs()) if self.relative else safe_divide(r, a @ b)
        ra = a * (s @ b.transpose(-2, -1))
        rb = b * (a.transpose(-2, -1) @ s)
        return ra / 2, rb / 2


class MeanPoolAlphaOne:
    """Average pooling as a linear layer with weights 1/n (all positive): R_t ∝ x_t⁺."""

    def __call__(self, x, fn, r):
        xp = x.clamp(min=0)
        return xp * vjp(fn, xp, safe_divide(r, fn(xp)))


class ZBox:
    """z^B rule for the first convolution, bounded per sample by the image's own min and max."""

    def __call__(self, x: torch.Tensor, conv: torch.nn.Conv2d, r: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        dims = tuple(range(1, x.dim()))
        low = x.amin(dim=dims, keepdim=True).expand_as(x)
        high = x.amax(dim=dims, keepdim=True).expand_as(x)
        kw = dict(stride=conv.stride, padding=conv.padding)
        z = (F.conv2d(x, w, **kw) - F.conv2d(low, wp, **kw) - F.conv2d(high, wn, **kw)) + EPS
        s = r / z

        def back(weight):
            return torch.nn.grad.conv2d_input(x.shape, weight, s, **kw)

        return x * back(w) - low * back(wp) - high * back(wn)


class RuleSet:
    """Which rule each kind of recorded node gets.

    epsilon: "absolute" (the reference's 1e-9 stabiliser) or "relative" (ε·(|a|+|b|) at additions
    and ε·(|a|@|b|) at bilinear products, ε = 1e-3: see docs/numerics.md). The linear, conv and
    pooling rules divide by sums of same-signed terms and need no other stabiliser."""

    def __init__(self, name: str, linear, add, conv, epsilon: str = "absolute"):
        self.name = name
        self.epsilon = epsilon
        self.linear = linear
        self.conv = conv
        self.add = add
        self.bilinear = BilinearHalved(relative=epsilon == "relative")
        self.pool = MeanPoolAlphaOne()
        self.zbox = ZBox()

    def relprop(self, node: Node, r: torch.Tensor) -> list:
        ins = [t.detach() for t in node.inputs]
        kind = node.kind
        if kind in ("pass", "softmax"):
            return [r]
        if kind == "move":
            return [vjp(node.fn, ins[0], r)]
        if kind == "linear":
            return [self.linear(ins[0], node.module.weight, r)]
        if kind == "add":
            return list(self.add(ins[0], ins[1], r))
        if kind == "matmul":
            return list(self.bilinear(ins[0], ins[1], r))
        if kind == "pool_mean":
            return [self.pool(ins[0], node.fn, r)]
        if kind == "conv_input":
            return [self.zbox(ins[0], node.module, r)]
        if kind == "conv":
            return [self.conv(ins[0], node.module, r)]
        raise ValueError(f"no LRP rule for recorded op kind {kind!r}")

    def __repr__(self):
        return f"RuleSet({self.name}, epsilon={self.epsilon})"


EPSILONS = ("absolute", "relative")


def _build(name: str, epsilon: str) -> RuleSet:
    ours = name == "ours"
    return RuleSet(name, AlphaOneBetaZero(shared=ours), AddProportional(rescale=ours, relative=epsilon == "relative"),
                   ConvAlphaOneBetaZero(shared=ours), epsilon=epsilon)


#: (rule set name, epsilon) -> RuleSet
RULE_SET_VARIANTS = {(name, eps): _build(name, eps) for name in ("ours", "classic") for eps in EPSILONS}
OURS = RULE_SET_VARIANTS[("ours", "absolute")]
CLASSIC = RULE_SET_VARIANTS[("classic", "absolute")]
RULE_SETS = {"ours": OURS, "classic": CLASSIC}
