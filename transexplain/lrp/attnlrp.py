"""The rule sets of AttnLRP (Achtibat et al. 2024) and CP-LRP (Ali et al. 2022) for the recorded tape.

Both walk the same `Tape` as the other relevance methods (`propagate`); they differ in what they
carry backwards:

* `AttnLRPRules` carries relevance and applies the paper's rules node by node: the ε-rule on every
  linear map (biases and added constants absorb their share), the softmax rule of its
  Proposition 3.1, the ε-rule followed by the uniform ½/½ split on the bilinear products Q·Kᵀ and
  A·V, the identity rule on elementwise non-linearities, and on LayerNorm the ε-rule of the affine
  map that is left once the standard deviation is held constant.
* `DetachedGradientRules` carries the gradient of the target logit through the forward in which the
  attention probabilities and LayerNorm's standard deviation are constants (CP-LRP's "detach, then
  Gradient × Input"); the caller multiplies by the input at the end.

docs/methods.md states every choice these rules make and where they differ from public code.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .core import Node, vjp


def stabilised_divide(r: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """r / (z + ε·sign(z)), i.e. r / copysign(|z| + ε, z) (+0 counts as +, -0 as -); with ε = 0,
    0 where z == 0. A new tensor (the rules below finish it in place)."""
    if eps > 0:
        return r / z.abs().add_(eps).copysign_(z)
    zero = z == 0
    return (r / z.masked_fill(zero, 1)).masked_fill_(zero, 0)


def _norm_dims(ln: nn.LayerNorm, x: torch.Tensor) -> tuple:
    return tuple(range(x.dim() - len(ln.normalized_shape), x.dim()))


def _ln_std(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm's σ = sqrt(Var[x] + eps) (biased variance, as the module computes it), kept broadcastable."""
    var = x.var(dim=_norm_dims(ln, x), unbiased=False, keepdim=True)
    return torch.sqrt(var + ln.eps)


def layer_norm_backward(ln: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, center: bool = True) -> torch.Tensor:
    """The vector-Jacobian product of y = γ·(x - E[x])/σ + β with σ held constant: g ← C(γ·g/σ),
    C the centring map (its own transpose). center=False also holds E[x] constant (C = identity)."""
    h = g / _ln_std(ln, x)
    if ln.weight is not None:
        h.mul_(ln.weight)
    if center:
        h.sub_(h.mean(dim=_norm_dims(ln, x), keepdim=True))
    return h


def _conv_backward(node: Node, s: torch.Tensor) -> torch.Tensor:
    conv = node.module
    x = node.inputs[0]
    return torch.nn.grad.conv2d_input(x.shape, conv.weight, s, stride=conv.stride, padding=conv.padding,
                                      dilation=conv.dilation, groups=conv.groups)


class AttnLRPRules:
    """AttnLRP's rules (Achtibat et al., ICML 2024) for every recorded node kind; `epsilon` is the ε
    of every ε-rule (linear layers, the patch-embedding convolution, additions, products, pooling,
    LayerNorm)."""

    name = "attnlrp"

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    def relprop(self, node: Node, r: torch.Tensor) -> list:
        ins = [t.detach() for t in node.inputs]
        z = node.out.detach()
        kind, eps = node.kind, self.epsilon
        if kind == "pass":
            if isinstance(node.fn, nn.LayerNorm):
                # y = γ(x - E[x])/σ + β with σ constant is affine in x: ε-rule, β absorbs its share
                x = ins[0]
                return [layer_norm_backward(node.fn, x, stabilised_divide(r, z, eps)).mul_(x)]
            # GELU, tanh, ReLU, dropout, identity, a constant scale: the identity rule
            return [r]
        if kind == "softmax":
            # Proposition 3.1: R_i = x_i (R_i - s_i Σ_j R_j); -inf logits (masks) count as 0
            x = ins[0]
            out = (r - z * r.sum(-1, keepdim=True)).mul_(x)
            masked = torch.isneginf(x)
            return [out.masked_fill_(masked, 0) if masked.any() else out]
        if kind == "move":
            return [vjp(node.fn, ins[0], r)]
        s = stabilised_divide(r, z, eps)
        if kind == "linear":
            return [(s @ node.module.weight.detach()).mul_(ins[0])]
        if kind in ("conv_input", "conv"):
            return [_conv_backward(node, s).mul_(ins[0])]
        if kind == "add":
            return [ins[0] * s, ins[1] * s]
        if kind == "matmul":
            a, b = ins
            return [(s @ b.transpose(-2, -1)).mul_(a).mul_(0.5), (a.transpose(-2, -1) @ s).mul_(b).mul_(0.5)]
        if kind == "pool_mean":
            return [vjp(node.fn, ins[0], s).mul_(ins[0])]
        raise ValueError(f"no AttnLRP rule for recorded op kind {kind!r}")

    def __repr__(self):
        return f"AttnLRPRules(epsilon={self.epsilon})"


class DetachedGradientRules:
    """The gradient of the forward in which the attention probabilities are constants (no gradient
    through the softmax) and every LayerNorm's σ is a constant (CP-LRP, Ali et al., ICML 2022).

    detach_mean=True also holds LayerNorm's mean constant (the public code's default configuration);
    the paper's LN-rule keeps the centring as a linear map (False, our default)."""

    name = "cp_lrp"

    def __init__(self, detach_mean: bool = False):
        self.detach_mean = bool(detach_mean)

    def relprop(self, node: Node, g: torch.Tensor) -> list:
        ins = [t.detach() for t in node.inputs]
        kind = node.kind
        if kind == "softmax":
            return [None]
        if kind == "pass":
            if isinstance(node.fn, nn.LayerNorm):
                return [layer_norm_backward(node.fn, ins[0], g, center=not self.detach_mean)]
            return [vjp(node.fn, ins[0], g)]
        if kind == "move":
            return [vjp(node.fn, ins[0], g)]
        if kind == "linear":
            return [g @ node.module.weight.detach()]
        if kind in ("conv_input", "conv"):
            return [_conv_backward(node, g)]
        if kind == "add":
            return [g, g]
        if kind == "matmul":
            a, b = ins
            return [g @ b.transpose(-2, -1), a.transpose(-2, -1) @ g]
        if kind == "pool_mean":
            return [vjp(node.fn, ins[0], g)]
        raise ValueError(f"no CP-LRP rule for recorded op kind {kind!r}")

    def __repr__(self):
        return f"DetachedGradientRules(detach_mean={self.detach_mean})"
