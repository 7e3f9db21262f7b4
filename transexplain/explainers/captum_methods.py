"""The classic gradient baselines at pixel level, computed by Captum: saliency, input × gradient,
integrated gradients and SmoothGrad.

Every method differentiates the raw (pre-softmax) logit of the target class with respect to the
model's input: the normalised pixels for images, the embedding output (B, N, D) for text (token ids
have no gradient; the embedding output is where `full_lrp` stops too). Images give a (B, H, W)
pixel map; text gives one score per token, taking the token-map path of `api.explain`.

Channel reduction: the signed methods (input × gradient, integrated gradients) sum over the colour
channels / hidden units; saliency and SmoothGrad take |gradient| and, for images, the maximum over
colour channels (Simonyan et al. 2014), for text the sum over hidden units.

Batch invariance: every map depends on its own sample only. SmoothGrad's noise is drawn per sample
from a generator seeded by the sample's content (XOR the `seed` option), not from the global RNG as
Captum's NoiseTunnel does (whose noise would depend on the batch and on the caller's RNG state), so
we draw the noise here and average Captum's Saliency over the noisy copies, which is what
NoiseTunnel(Saliency, nt_type="smoothgrad") computes.

Option `libragrad` (every method; default false): the gradients are taken through LibraGrad's
rewired backward (Mehri et al. CVPR 2025; `lrp.attnlrp.LibraGrad`: attention probabilities,
LayerNorm's σ and the gate of GELU / SiLU / QuickGELU held constant in the backward, each factor of
a gated MLP product (SwiGLU) given half its gradient, the forward unchanged), through the adapter's
recorded forward. docs/methods.md states the rules.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import UserError
from ..parallel import thread_map
from . import memory
from .base import Explainer, content_seed, register, select_target

#: IG's quadrature: Captum's default, Gauss-Legendre nodes and weights from numpy in float64. Captum
#: 0.9.0's Riemann rules are not offered: their nodes come from a float32 linspace, and its trapezoid
#: weights sum to (n-1)/n, so completeness would fail by a factor (n-1)/n for any model.
QUADRATURE = "gausslegendre"


class _CaptumInput:
    """What Captum differentiates for one batch: `inputs` (a tensor with the batch on dim 0), a
    `forward(inputs, *args)` returning the logits, and `args` (Captum's additional_forward_args,
    repeated by Captum along with the inputs)."""

    def __init__(self, adapter, x):
        self.adapter = adapter
        self.pixels = bool(getattr(adapter, "pixel_input", True))
        #: set by `keep_clean_logits`: the target to check, and the logits of the first forward that
        #: Captum runs on `inputs` themselves (Saliency, InputXGradient: their only forward)
        self.target = None
        self.clean_logits = None
        if self.pixels:
            self.inputs = x.detach().requires_grad_(True)
            self.args = None
            self.valid = None
        else:
            with torch.no_grad():
                self.inputs = adapter.embed(x).detach()
            self.inputs.requires_grad_(True)
            self._has_types = x.token_type_ids is not None
            types = x.token_type_ids if self._has_types else torch.zeros_like(x.input_ids)
            self.args = (x.input_ids, x.attention_mask, types)
            self.valid = x.attention_mask.bool()

    def forward(self, inputs, *args):
        out = self._forward(inputs, *args)
        if self.target is not None and self.clean_logits is None and inputs.shape == self.inputs.shape \
                and inputs.data_ptr() == self.inputs.data_ptr():
            self.clean_logits = out.detach()
            select_target(self.clean_logits, self.target)  # a class out of range: one sentence, not an IndexError
        return out

    def _forward(self, inputs, *args):
        if self.pixels:
            return self.adapter.run(inputs).logits
        from ..models.text import TextBatch

        ids, mask, types = args
        enc = self.adapter.encoder
        last = getattr(enc, "embeddings_project", None) or enc.embeddings
        # the embedding output is replaced by `inputs`, so the rest of the forward runs from there
        handle = last.register_forward_hook(lambda module, args_, output: inputs)
        try:
            return self.adapter.run(TextBatch(ids, mask, types if self._has_types else None)).logits
        finally:
            handle.remove()

    def reduce_signed(self, attr):
        """Sum over the colour channels (B, C, H, W) → (B, H, W), or the hidden units (B, N, D) → (B, N)."""
        return attr.sum(1) if self.pixels else attr.sum(-1)

    def reduce_magnitude(self, attr):
        """|attr| already taken: max over the colour channels, or the sum over the hidden units."""
        return attr.amax(1) if self.pixels else attr.sum(-1)


def _target_and_logits(adapter, x, target):
    with torch.no_grad():
        logits = adapter.run(x).logits
    return select_target(logits, target), logits.detach()


def graph_bytes_per_row(wrapped) -> int:
    """What one more input row adds to a gradient pass's saved tensors (`memory.graph_bytes_per_row`),
    for Captum's forward from `wrapped.inputs` (pixels, or the embedding output of text)."""
    inputs = wrapped.inputs
    model = getattr(wrapped.adapter, "model", wrapped.adapter)

    def rows_input(rows):  # the inputs a fresh leaf (floating: requires grad), the extra arguments views
        args = () if wrapped.args is None else memory.repeat_first_row(wrapped.args, rows, leaf=False)
        return memory.repeat_first_row(inputs, rows), args

    key = ("captum", id(model), tuple(inputs.shape[1:]), inputs.dtype, str(inputs.device))
    return memory.graph_bytes_per_row(key, lambda xa: wrapped._forward(xa[0], *xa[1]), rows_input)


def rows_per_pass(options, wrapped) -> int:
    """The `internal_batch_size` option as rows per gradient pass: a positive integer as given, or
    "auto": as many rows as keep one pass's graph under the device's budget (`memory`: 1 GiB on a
    CPU, a quarter of a GPU's memory). Memory only: every row's map is computed alone."""
    size = options["internal_batch_size"]  # checked when the method was set up (`check_rows_option`)
    if size == "auto":
        return memory.rows_within_budget(graph_bytes_per_row(wrapped), wrapped.inputs.device)
    return int(size)


def check_rows_option(size) -> None:
    """`internal_batch_size` is "auto" or a positive whole number (a digit string from the CLI too)."""
    if size == "auto":
        return
    if isinstance(size, bool) or not isinstance(size, (int, str)) or not str(size).isdigit() or int(size) < 1:
        raise UserError(f"internal_batch_size must be a positive number of rows per pass or 'auto', got {size!r}.")


def libragrad_context(options):
    """The context a method's gradients are taken in: LibraGrad's backward when the option says so."""
    value = options.get("libragrad", False)
    if not isinstance(value, bool):
        raise UserError(f"libragrad must be true or false, got {value!r}.")
    if not value:
        return contextlib.nullcontext()
    from ..lrp.attnlrp import LibraGrad
    from ..lrp.core import gradient_rules

    return gradient_rules(LibraGrad())


def _positive_int(options, key: str) -> int:
    value = options[key]
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}.")
    return int(value)


class _CaptumExplainer(Explainer):
    class_specific = True
    #: images: a (B, H, W) pixel map; text: one score per token (set per call, before api.explain reads it)
    pixel_level = True
    needs = frozenset({"input_gradient"})

    @classmethod
    def defaults(cls):
        return {"libragrad": False}

    def __init__(self, **options):
        super().__init__(**options)
        if "internal_batch_size" in self.options:  # refused when the method is set up, before any work
            check_rows_option(self.options["internal_batch_size"])

    #: the Captum call's own forward runs on the clean inputs (Saliency, InputXGradient): with a given
    #: target its logits are the clean logits, and no separate forward is run
    reuses_forward = False

    def _start(self, adapter, x, target):
        wrapped = _CaptumInput(adapter, x)
        self.pixel_level = wrapped.pixels
        if self.reuses_forward and target is not None:
            t = torch.as_tensor(target, device=wrapped.inputs.device).long().reshape(-1)
            if t.numel() not in (1, len(wrapped.inputs)):
                raise UserError(f"Got {t.numel()} targets for {len(wrapped.inputs)} images: give one target, or one per image.")
            wrapped.target = t.expand(len(wrapped.inputs)) if t.numel() == 1 else t
            return wrapped, wrapped.target, None
        target, logits = _target_and_logits(adapter, x, target)
        return wrapped, target, logits

    @staticmethod
    def _finish(adapter, x, wrapped):
        if not wrapped.pixels:
            # the text adapter keeps the attention mask of the batch it ran last (to zero padding):
            # Captum ran it on the expanded batch, so run the clean batch once more
            with torch.no_grad():
                adapter.run(x)

    def _explain(self, adapter, x, target, attribute, signed: bool):
        """The shared frame of every method: wrap the input, run `attribute(wrapped, target)` (the
        Captum call), restore the adapter, and reduce the attribution to one score per pixel or token
        (signed: summed; else |.| already taken, see `_CaptumInput.reduce_magnitude`)."""
        with libragrad_context(self.options):  # checks the option before any work
            wrapped, target, logits = self._start(adapter, x, target)
            attr = attribute(wrapped, target).detach()
        if logits is None:
            logits = wrapped.clean_logits
        self._finish(adapter, x, wrapped)
        return (wrapped.reduce_signed(attr) if signed else wrapped.reduce_magnitude(attr)), logits, target


@register
class Saliency(_CaptumExplainer):
    name = "saliency"
    description = ("Saliency (Simonyan et al. 2014, Captum Saliency): |∂y_t/∂x|, max over colour channels "
                   "(text: summed over hidden units of the embedding output); option libragrad=true: LibraGrad's backward.")

    reuses_forward = True

    def scores(self, adapter, x, target):
        from captum.attr import Saliency as CaptumSaliency

        return self._explain(adapter, x, target, lambda wrapped, t: CaptumSaliency(wrapped.forward).attribute(
            wrapped.inputs, target=t, abs=True, additional_forward_args=wrapped.args), signed=False)


@register
class InputXGradient(_CaptumExplainer):
    name = "input_x_gradient"
    description = ("Input × gradient (Shrikumar et al. 2016, Captum InputXGradient): x ⊙ ∂y_t/∂x summed over "
                   "colour channels (text: embedding output, summed over hidden units); option libragrad=true: LibraGrad's backward.")

    reuses_forward = True

    def scores(self, adapter, x, target):
        from captum.attr import InputXGradient as CaptumInputXGradient

        return self._explain(adapter, x, target, lambda wrapped, t: CaptumInputXGradient(wrapped.forward).attribute(
            wrapped.inputs, target=t, additional_forward_args=wrapped.args), signed=True)


def _baseline(adapter, wrapped, choice):
    """The IG reference point x', in the model's input space."""
    if choice == "zeros":
        return torch.zeros_like(wrapped.inputs)
    if choice == "black":
        if not wrapped.pixels or not hasattr(adapter, "mean"):
            raise UserError("baseline='black' needs an image model with a known mean and std; use baseline='zeros'.")
        mean = torch.tensor(adapter.mean, dtype=torch.float64)
        std = torch.tensor(adapter.std, dtype=torch.float64)
        black = (-mean / std).to(wrapped.inputs.dtype).to(wrapped.inputs.device)
        return black[None, :, None, None].expand_as(wrapped.inputs).contiguous()
    raise UserError(f"Unknown baseline {choice!r}: choose 'zeros' (0 in the model's input space) or 'black' (images).")


@register
class IntegratedGradients(_CaptumExplainer):
    name = "integrated_gradients"
    description = ("Integrated gradients (Sundararajan et al. 2017, Captum IntegratedGradients): "
                   "(x−x') ⊙ ∫∂y_t/∂x along x'→x, summed over colour channels; baseline 0, 20 steps; "
                   "option libragrad=true: LibraGrad's backward.")

    @classmethod
    def defaults(cls):
        return {"steps": 20, "baseline": "zeros", "internal_batch_size": "auto", "libragrad": False}

    def scores(self, adapter, x, target):
        from captum.attr import IntegratedGradients as CaptumIG

        steps = _positive_int(self.options, "steps")

        def attribute(wrapped, t):
            baselines = _baseline(adapter, wrapped, self.options["baseline"])
            rows = rows_per_pass(self.options, wrapped)
            ig = CaptumIG(wrapped.forward)
            if rows >= len(wrapped.inputs):  # Captum runs rows // B steps of the whole batch per pass
                return ig.attribute(wrapped.inputs, baselines=baselines, target=t, additional_forward_args=wrapped.args,
                                    n_steps=steps, method=QUADRATURE, internal_batch_size=rows)
            parts = []  # fewer rows than samples: the samples in groups, one step of a group per pass
            for start in range(0, len(wrapped.inputs), rows):
                part = slice(start, start + rows)
                args = None if wrapped.args is None else tuple(a[part] for a in wrapped.args)
                parts.append(ig.attribute(wrapped.inputs[part].detach(), baselines=baselines[part], target=t[part],
                                          additional_forward_args=args, n_steps=steps, method=QUADRATURE,
                                          internal_batch_size=len(wrapped.inputs[part])).detach())
            return torch.cat(parts)

        return self._explain(adapter, x, target, attribute, signed=True)


@register
class SmoothGrad(_CaptumExplainer):
    name = "smoothgrad"
    description = ("SmoothGrad (Smilkov et al. 2017, Captum Saliency on noisy copies): mean |∂y_t/∂x| over 20 "
                   "Gaussian copies (σ = 0.15 × the sample's value range), max over colour channels; "
                   "option libragrad=true: LibraGrad's backward.")

    @classmethod
    def defaults(cls):
        return {"samples": 20, "noise": 0.15, "seed": 0, "internal_batch_size": "auto", "libragrad": False}

    def noise(self, x, wrapped) -> torch.Tensor:
        """(B, samples, *input shape) Gaussian noise, each sample's drawn from its own generator."""
        n = _positive_int(self.options, "samples")
        level = float(self.options["noise"])
        if not level >= 0:
            raise UserError(f"noise must be a non-negative fraction of the input range, got {self.options['noise']!r}.")
        inputs = wrapped.inputs.detach()
        seeds = [content_seed(sample, self.options["seed"]) for sample in x]

        def draw(i: int) -> torch.Tensor:  # one generator per sample keeps the map independent of the batch
            gen = torch.Generator().manual_seed(seeds[i])
            if wrapped.pixels:
                values = inputs[i]
                eps = torch.randn((n, *values.shape), generator=gen, dtype=torch.float64)
            else:
                valid = wrapped.valid[i].cpu()
                values = inputs[i][wrapped.valid[i]]
                eps = torch.zeros((n, *inputs.shape[1:]), dtype=torch.float64)
                eps[:, valid] = torch.randn((n, int(valid.sum()), inputs.shape[-1]), generator=gen, dtype=torch.float64)
            span = (values.max() - values.min()).double().cpu() if values.numel() else torch.tensor(0.0, dtype=torch.float64)
            return eps * (level * span)

        # The float64 draws run on the CPU whatever the device (the same noise on every machine) and
        # cost more than the model on a GPU (8 x 20 x 3 x 224 x 224 normals: ~1 s on one thread), so
        # the samples' draws run in parallel threads (each has its own generator: the same numbers).
        draws = thread_map(draw, range(len(x)))
        return torch.stack(draws).to(dtype=inputs.dtype, device=inputs.device)

    def scores(self, adapter, x, target):
        return self._explain(adapter, x, target, lambda wrapped, t: self._mean_saliency(x, wrapped, t), signed=False)

    def _mean_saliency(self, x, wrapped, target):
        """Mean |gradient| over the seeded noisy copies of each sample, in chunks of rows."""
        from captum.attr import Saliency as CaptumSaliency

        eps = self.noise(x, wrapped)
        n_batch, n = eps.shape[:2]
        rows = (wrapped.inputs.detach().unsqueeze(1) + eps).reshape(n_batch * n, *wrapped.inputs.shape[1:])
        row_target = target.repeat_interleave(n)
        row_args = None if wrapped.args is None else tuple(a.repeat_interleave(n, 0) for a in wrapped.args)
        chunk = rows_per_pass(self.options, wrapped)
        saliency = CaptumSaliency(wrapped.forward)
        parts = []
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            parts.append(saliency.attribute(
                rows[part].requires_grad_(True), target=row_target[part], abs=True,
                additional_forward_args=None if row_args is None else tuple(a[part] for a in row_args)).detach())
        return torch.cat(parts).reshape(n_batch, n, *wrapped.inputs.shape[1:]).mean(1)
