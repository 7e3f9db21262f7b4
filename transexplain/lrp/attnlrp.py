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

import math
import weakref

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


def layer_norm_stats(x: torch.Tensor, normalized_shape, eps: float) -> tuple:
    """(E[x], 1/σ) over the trailing `normalized_shape` dims, σ = sqrt(Var[x] + eps) (biased variance,
    as LayerNorm computes it), both kept broadcastable. From ATen's own LayerNorm kernel, which
    returns them with its output: 7x faster on the CPU than `Tensor.var` (one pass instead of two)."""
    with torch.no_grad():
        _, mean, rstd = torch.native_layer_norm(x.detach(), tuple(normalized_shape), None, None, float(eps))
    return mean, rstd


def token_stats(h: torch.Tensor, eps: float) -> tuple:
    """(μ, σ) of each token's features (the last dim) of `h`, flattened to (B, tokens): what a
    LayerNorm with this `eps` divides by, as the adapters record it before each block (`ln_stats`)."""
    mean, rstd = layer_norm_stats(h, h.shape[-1:], eps)
    return mean.flatten(1), rstd.reciprocal_().flatten(1)


def _ln_rstd(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """1/σ of LayerNorm `ln` at its input x, broadcastable to x."""
    return layer_norm_stats(x, ln.normalized_shape, ln.eps)[1]


def layer_norm_backward(ln: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, center: bool = True) -> torch.Tensor:
    """The vector-Jacobian product of y = γ·(x - E[x])/σ + β with σ held constant: g ← C(γ·g/σ),
    C the centring map (its own transpose). center=False also holds E[x] constant (C = identity)."""
    h = g * _ln_rstd(ln, x)
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


# -- the same rules as modified gradients of the recorded forward ---------------------------------
# Under `core.gradient_rules(rules)` every Tape hands each op's output to `rules.start().wrap(node)`
# while the forward runs; one `torch.autograd.grad` of the target logit then carries, instead of the
# relevance R_t of a tensor t, a "modified gradient" g_t with R_t = t ⊙ g_t, and the input relevance
# is x ⊙ g_x. For AttnLRP (the walk above, `AttnLRPRules`) that identity holds op by op:
#   ε-rule nodes (linear, conv, add, matmul, pooling, LayerNorm's affine part): R_in = in ⊙ Jᵀ(R_z/stab(z))
#     = in ⊙ Jᵀ(f(z) g_z) with f(z) = z/stab(z) = |z|/(|z|+ε): a hook multiplies g_z by f(z) (by f/2 on
#     the bilinear products: the uniform rule), autograd does Jᵀ;
#   the softmax rule x ⊙ (R_s - s ΣR_s) with R_s = s ⊙ g_s is x ⊙ (softmax's own vector-Jacobian
#     product of g_s): plain autograd;
#   LayerNorm: σ held constant, its backward g ↦ C(γ g/σ) (`layer_norm_backward`);
#   the identity rule R_x = R_y (GELU, scales, ...): g_x = (y/x) g_y (0 where x = 0, where y = 0 as
#     well for every op an adapter records); when x is the output of an ε-rule node with no other
#     consumer the two steps are done as one, g_z = g_y y/stab(z);
#   index ops: plain autograd (their adjoint), as the walk's `vjp`.
# It computes the same numbers as the walk up to rounding, without its per-op Python work, its
# vjp graphs for index ops and its multiplications by every input (tests/test_attnlrp.py compares).
# DetachedGradient (CP-LRP) and LibraGrad only cut or replace a few local gradients.


class _Override(torch.autograd.Function):
    """Output `y` (computed by the caller, values untouched), gradient `backward(g)` for `x`."""

    @staticmethod
    def forward(ctx, x, y, backward):
        ctx.backward = backward
        return y

    @staticmethod
    def backward(ctx, g):
        return ctx.backward(g), None, None


def override_gradient(x: torch.Tensor, y: torch.Tensor, backward) -> torch.Tensor:
    """y's values, with ∂/∂x given by `backward(grad_y)` instead of y's own graph."""
    return _Override.apply(x, y.detach(), backward)


class _LayerNormConstantStd(torch.autograd.Function):
    """LayerNorm's output `y` (computed by the module) with the gradient of y = γ(x - E[x])/σ + β at
    σ constant (`layer_norm_backward`); γ and β get their usual gradients (x̂ summed, g summed), so
    that FullGrad's bias terms can be read too."""

    @staticmethod
    def forward(ctx, x, weight, bias, y, ln, center):
        ctx.save_for_backward(x)
        ctx.ln, ctx.center = ln, center
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ln = ctx.ln
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = layer_norm_backward(ln, x, g, center=ctx.center)
        dims = tuple(range(g.dim() - len(ln.normalized_shape)))
        if ctx.needs_input_grad[1]:
            mean, rstd = layer_norm_stats(x, ln.normalized_shape, ln.eps)
            x_hat = (x - mean).mul_(rstd)
            gw = (g * x_hat).sum(dims)
        if ctx.needs_input_grad[2]:
            gb = g.sum(dims)
        return gx, gw, gb, None, None, None


def layer_norm_constant_std(ln: nn.LayerNorm, x: torch.Tensor, y: torch.Tensor, center: bool = True) -> torch.Tensor:
    """y = ln(x)'s values, differentiated with σ (and, center=False, E[x]) held constant."""
    return _LayerNormConstantStd.apply(x, ln.weight, ln.bias, y.detach(), ln, center)


def detached_leaf(t: torch.Tensor) -> torch.Tensor:
    """t's values cut from the graph behind it, but still a tensor whose gradient can be asked for
    (the attention maps that GradCAM & co. differentiate)."""
    return t.detach().requires_grad_(True)


class _EpsState:
    """What an ε-rule output's gradient hook needs. It holds no reference to the output itself: the
    hook is stored on that tensor, so a reference back would be a cycle through autograd's C++ side
    that Python's garbage collector cannot see (each call's whole graph was kept: 1.85 GB per call
    of 3 texts of 512 tokens)."""
    __slots__ = ("half", "guard", "consumers", "fused")

    def __init__(self, half, guard):
        self.half, self.guard = half, guard
        self.consumers, self.fused = 0, False


class AttnLRPGradient:
    """AttnLRP (`AttnLRPRules`' rules) as a modified gradient of the recorded forward; `epsilon` as there."""

    name = "attnlrp"

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    def start(self):
        return _AttnLRPPass(self.epsilon)

    def __repr__(self):
        return f"AttnLRPGradient(epsilon={self.epsilon})"


class _AttnLRPPass:
    """One forward's state: the ε-rule outputs seen so far and how many ops read each."""

    EPS_KINDS = ("linear", "conv_input", "conv", "pool_mean", "add", "matmul")

    def __init__(self, eps: float):
        self.eps = eps
        self.states: dict[int, tuple] = {}  # id(output) -> (weak reference to it, its _EpsState)

    def _state(self, t):
        entry = self.states.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def wrap(self, node: Node) -> torch.Tensor:
        for t in node.inputs:
            st = self._state(t)
            if st is not None:
                st.consumers += 1
        kind, z = node.kind, node.out
        if kind in self.EPS_KINDS:
            # an added constant may hold -inf (a mask): f(±inf) = nan there, where the gradient is 0
            guard = self.eps == 0 or (kind == "add" and not all(t.requires_grad for t in node.inputs))
            return self._eps_output(z, half=kind == "matmul", guard=guard)
        if kind == "pass":
            x = node.inputs[0]
            if isinstance(node.fn, nn.LayerNorm):
                y = layer_norm_constant_std(node.fn, x, z)
                return self._eps_output(y, half=False, guard=self.eps == 0)
            if z is x:  # an identity op (nn.Identity, dropout in eval): R passes, so does g
                return z
            return override_gradient(x, z, self._identity_backward(x, z))
        return z  # softmax (its rule is its own vector-Jacobian product), index ops

    def _eps_output(self, z, half, guard):
        st = _EpsState(half, guard)
        self.states[id(z)] = (weakref.ref(z), st)
        zd, eps = z.detach(), self.eps

        def hook(g):
            if st.fused:  # the only consumer, an identity-rule op, already divided by stab(z)
                return g
            a = zd.abs()
            f = a.div_(a + eps)  # z / stab(z), as |z| / (|z| + ε)
            if guard:
                f.nan_to_num_(0.0)
            if half:
                f.mul_(0.5)
            return f.mul_(g)

        z.register_hook(hook)
        return z

    def _identity_backward(self, x, y):
        xd, yd, eps = x.detach(), y.detach(), self.eps
        st = self._state(x)

        def backward(g):
            if st is not None and st.consumers == 1 and not st.fused:
                st.fused = True  # g_z = g_y · y / stab(z): the identity rule and z's ε-rule in one step
                out = stabilised_divide(g * yd, xd, eps)
                return out.mul_(0.5) if st.half else out
            out = (g * yd).div_(xd)
            return out.masked_fill_(xd == 0, 0)

        return backward


def gelu_gate(fn) -> "callable | None":
    """For an activation y = x · gate(x) with a known gate (GELU: Φ(x), exact or tanh-approximated;
    SiLU: sigmoid(x); CLIP's QuickGELU: sigmoid(1.702 x)), the function x ↦ gate(x); None otherwise."""
    name = type(fn).__name__
    approximate = getattr(fn, "approximate", "none")
    if isinstance(fn, nn.GELU) or name in ("GELUActivation", "GELU"):
        if approximate == "tanh":
            return lambda x: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
        return lambda x: 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return lambda x: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if isinstance(fn, nn.SiLU) or name in ("SiLUActivation", "Swish"):
        return torch.sigmoid
    if name in ("QuickGELU", "QuickGELUActivation"):
        return lambda x: torch.sigmoid(1.702 * x)
    return None


def _attention_product(node: Node) -> bool:
    """Whether a recorded product is one of attention's (Q·Kᵀ, A·V, DeBERTa's c2p/p2c): every adapter
    tags those ("attn_scores", "attn_value", "attn_c2p", ... with the block). The untagged products
    are the gated-MLP products act(x W_g) ⊙ (x W_u) that `models.eva.elementwise_product` records
    (EVA-02's SwiGLU / packed GluMlp, Llama's MLP)."""
    return node.tag is not None and str(node.tag[0]).startswith("attn")


def _halve(g: torch.Tensor) -> torch.Tensor:
    return g * 0.5


class DetachedGradient:
    """The gradient of the forward in which the attention probabilities and every LayerNorm's σ are
    constants (CP-LRP: `DetachedGradientRules` as a modified gradient of the recorded forward);
    `detach_mean=True` holds LayerNorm's mean constant too. `gate=True` also holds the gate of each
    gated activation constant (GELU = x·Φ(x): gradient Φ(x)), LibraGrad's third rule.
    `half_products=True` gives each factor of a product of two activations that is not attention's
    (a gated MLP's act(x W_g) ⊙ (x W_u)) half its gradient: the product's output gradient is halved
    before autograd sends it to both factors (LibraGrad's "DU" mode for gated MLPs)."""

    name = "cp_lrp"

    def __init__(self, detach_mean: bool = False, gate: bool = False, half_products: bool = False):
        self.detach_mean, self.gate, self.half_products = bool(detach_mean), bool(gate), bool(half_products)

    def start(self):
        return self

    def wrap(self, node: Node) -> torch.Tensor:
        kind, z = node.kind, node.out
        if kind == "softmax":
            return detached_leaf(z)
        if kind == "pass":
            x = node.inputs[0]
            if isinstance(node.fn, nn.LayerNorm):
                return layer_norm_constant_std(node.fn, x, z, center=not self.detach_mean)
            gate = gelu_gate(node.fn) if self.gate else None
            if gate is not None:
                xd = x.detach()
                return override_gradient(x, z, lambda g: g * gate(xd))
        if (kind == "matmul" and self.half_products and not _attention_product(node)
                and all(t.requires_grad for t in node.inputs)):
            # both factors carry gradient: g_a = ½ g·bᵀ, g_b = ½ aᵀ·g (a constant factor: the
            # product is linear in the other one and keeps its gradient)
            z.register_hook(_halve)
        return z

    def __repr__(self):
        return f"DetachedGradient(detach_mean={self.detach_mean}, gate={self.gate}, half_products={self.half_products})"


class LibraGrad(DetachedGradient):
    """LibraGrad (Mehri, Baghshah, Pilehvar, CVPR 2025) on the adapters' blocks: the attention
    probabilities constant (no gradient to Q and K), LayerNorm's σ constant (its centring kept),
    gated activations' gates constant, each factor of a gated-MLP product (SwiGLU) half its gradient.
    docs/methods.md states the rules and what is left out."""

    name = "libragrad"

    def __init__(self):
        super().__init__(detach_mean=False, gate=True, half_products=True)

    def __repr__(self):
        return "LibraGrad()"
