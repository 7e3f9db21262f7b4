"""The relevance-propagation engine: a tape of the ops an adapter's forward ran, walked backwards.

An adapter re-runs the forward of an unmodified model through a `Tape`; each op it records knows
which kind of rule applies to it. `propagate` then carries relevance from the logits back through
the recorded ops with one `RuleSet`, summing relevance where a tensor fanned out (the Clone rule).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / (b + 1e-9), with the stabiliser added whatever the sign of b, and 0 wherever b == 0."""
    den = b + EPS
    den = torch.where(den == 0, torch.full_like(den, EPS), den)
    return a / den * (b != 0).to(a.dtype)


def per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first, kept broadcastable against `t`."""
    return t.reshape(t.shape[0], -1).sum(1).reshape((-1,) + (1,) * (t.dim() - 1))


@dataclass
class Node:
    """One recorded op: its kind decides which rule propagates relevance through it."""

    kind: str  # "linear" | "add" | "matmul" | "pass" | "softmax" | "move" | "pool_mean" | "conv_input" | "conv"
    inputs: list[torch.Tensor]
    out: torch.Tensor
    fn: Callable | None = None  # for "move": the index op itself (relevance follows it backwards); for "pass": the op
    module: torch.nn.Module | None = None  # for "linear", "conv_input" and "conv"
    tag: tuple | None = None  # e.g. ("attn_value", block) on the A·V product


_GRADIENT_RULES: contextvars.ContextVar = contextvars.ContextVar("tape_gradient_rules", default=None)


def active_rules():
    """The rule set `gradient_rules` has switched on here (None: plain gradients)."""
    return _GRADIENT_RULES.get()


@contextlib.contextmanager
def gradient_rules(rules):
    """Every `Tape` created inside this block (i.e. every recorded forward an adapter runs) hands
    each op's output to `rules.start()`'s `wrap(node)`, which may give it a modified backward (a
    tensor hook, or an output whose gradient is its own): the forward values are unchanged, and
    one `torch.autograd.grad` then computes a modified gradient (AttnLRP, CP-LRP, LibraGrad:
    `lrp/attnlrp.py`). `rules=None` switches it off."""
    token = _GRADIENT_RULES.set(rules)
    try:
        yield rules
    finally:
        _GRADIENT_RULES.reset(token)


class Tape:
    """Records the ops of a forward pass. With `record=False` it only computes (no overhead)."""

    def __init__(self, record: bool = True):
        self.record = record
        self.nodes: list[Node] = []
        rules = _GRADIENT_RULES.get()
        self.gradient = rules.start() if rules is not None else None  # see `gradient_rules`

    def _push(self, node: Node) -> torch.Tensor:
        if self.gradient is not None and node.out.requires_grad:
            node.out = self.gradient.wrap(node)
        if self.record:
            self.nodes.append(node)
        return node.out

    def linear(self, x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
        return self._push(Node("linear", [x], module(x), module=module))

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Residual or bias-like addition; a constant `b` is broadcast to `a`'s shape first."""
        if b.shape != a.shape:
            b = b.expand_as(a)
        return self._push(Node("add", [a, b], a + b))

    def matmul(self, a: torch.Tensor, b: torch.Tensor, tag: tuple | None = None) -> torch.Tensor:
        return self._push(Node("matmul", [a, b], a @ b, tag=tag))

    def passthrough(self, fn: Callable, x: torch.Tensor) -> torch.Tensor:
        """An op whose relevance passes unchanged (LayerNorm, GELU, softmax, a scale)."""
        y = fn(x)
        if self.record and y.shape != x.shape:
            raise ValueError("a pass-through op must keep the shape of its input")
        return self._push(Node("pass", [x], y, fn=fn))

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """The attention softmax over the last dim: its own kind, so that a rule set can give it its
        own rule (AttnLRP, CP-LRP); the classic rule sets pass relevance through it unchanged."""
        return self._push(Node("softmax", [x], x.softmax(dim=-1), fn=_last_dim_softmax))

    def move(self, fn: Callable, x: torch.Tensor) -> torch.Tensor:
        """An op that only moves, copies or drops entries (reshape, permute, roll, cat, select)."""
        return self._push(Node("move", [x], fn(x), fn=fn))

    def pool_mean(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Average pooling, propagated like a linear layer whose weights are all 1/n."""
        return self._push(Node("pool_mean", [x], x.mean(dim), fn=lambda t: t.mean(dim)))

    def conv_input(self, x: torch.Tensor, module: torch.nn.Conv2d) -> torch.Tensor:
        """The patch-embedding convolution on the pixels (z^B rule, bounded by the image's range)."""
        return self._push(Node("conv_input", [x], module(x), module=module))

    def conv(self, x: torch.Tensor, module: torch.nn.Conv2d) -> torch.Tensor:
        """A convolution on features (a conv stem's inner layers): propagated like a linear layer."""
        return self._push(Node("conv", [x], module(x), module=module))


def _last_dim_softmax(t: torch.Tensor) -> torch.Tensor:
    return t.softmax(dim=-1)


def vjp(fn: Callable, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Send relevance back through an index op: the transpose of a selection is its adjoint."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xi), xi, r)
    return g


@dataclass
class Propagation:
    """What a relevance pass leaves behind: captured relevances by tag, and the input relevance."""

    captured: dict = field(default_factory=dict)
    input_relevance: torch.Tensor | None = None


def propagate(
    tape: Tape,
    output: torch.Tensor,
    seed: torch.Tensor,
    rules,
    capture: Callable[[tuple], bool] = lambda tag: False,
    stop: Callable[[dict], bool] = lambda captured: False,
    input_tensor: torch.Tensor | None = None,
    on_node: Callable | None = None,
) -> Propagation:
    """Walk the tape backwards from `output` with relevance `seed`.

    `capture(tag)` says which tagged nodes' first-input relevance to keep (R^(b) is the relevance
    of A after the A·V rule); `stop(captured)` ends the walk early once everything needed is there.
    `on_node(node, r_out, r_ins)` sees every step (the conservation tests use it).
    """
    rel: dict[int, torch.Tensor] = {id(output): seed.detach()}
    result = Propagation()
    with torch.no_grad():
        for node in reversed(tape.nodes):
            r = rel.pop(id(node.out), None)
            if r is None:
                continue
            r_ins = rules.relprop(node, r)
            if on_node is not None:
                on_node(node, r, r_ins)
            for x, rx in zip(node.inputs, r_ins):
                if rx is None:
                    continue
                key = id(x)
                rel[key] = rel[key] + rx if key in rel else rx
            if node.tag is not None and capture(node.tag):
                result.captured[node.tag] = r_ins[0]
                if stop(result.captured):
                    return result
    if input_tensor is not None:
        result.input_relevance = rel.get(id(input_tensor))
    return result
