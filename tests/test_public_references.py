"""Our maps against the public implementations, run here on the same weights and inputs (issue 13).

1. Captum 0.9.0 called directly on the plain model (timm's own forward; Hugging Face's own forward
   for text), with the channel reduction of docs/methods.md applied by hand, against
   `transexplain.explain(...).token_map` (the un-normalised (B, H, W) pixel map, or the per-token
   scores): saliency, input × gradient, integrated gradients (both baselines) and SmoothGrad (Captum's
   NoiseTunnel fed our seeded noise).
2. lxt 2.1's CP-LRP (`lxt.efficient.models.vit_torch.cp_LRP`, the patch map lxt ships for
   torchvision's ViT) against our `cp_lrp` on a torchvision ViT with the same weights.

Tolerances are relative to the reference map's largest |entry|. Every comparison is float64 on
tiny random models; the figures in the comments were measured on the shared CPU machine, natively
and with ATEN_CPU_CAPABILITY=default.
"""
import contextlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import make_text_batch, make_tiny_bert, make_vit
from transexplain import explain
from transexplain.explainers import get_method

captum_attr = pytest.importorskip("captum.attr")

#: the same float64 gradients, taken through a different forward (timm's / HF's own modules against
#: the adapter's recorded forward): only the rounding of a different operation order differs
SAME_FLOAT64 = 1e-12


def rel_diff(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def images(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def vit():
    return make_vit(depth=2, seed=0)  # timm ViT, 16x16 images, patch 4, 2 blocks, 5 classes, float64


TARGET = torch.tensor([0, 2, 4])


@contextlib.contextmanager
def our_noise(eps):
    """Captum's NoiseTunnel adds `torch.normal(0, stdev)` to each input repeated `nt_samples` times
    (`repeat_interleave`, sample-major); here it adds our (B, n, ...) noise in that same order instead.
    NoiseTunnel has no argument for given noise, so its static `_add_noise_to_input` is replaced for
    the duration of the call; everything else (expanding target and additional arguments, calling the
    wrapped method, summing and dividing by n) is Captum's."""
    from captum.attr import NoiseTunnel

    original = NoiseTunnel.__dict__["_add_noise_to_input"]

    def add(input, stdev, nt_samples_partition):
        assert nt_samples_partition == eps.shape[1] and input.shape == (eps.shape[0], *eps.shape[2:])
        return input.repeat_interleave(nt_samples_partition, dim=0) + eps.reshape(-1, *eps.shape[2:])

    NoiseTunnel._add_noise_to_input = staticmethod(add)
    try:
        yield
    finally:
        NoiseTunnel._add_noise_to_input = original


# -- 1a. Captum on timm's ViT -----------------------------------------------------------------------------
def test_saliency_and_input_x_gradient_equal_captum(vit):
    # measured (native / ATEN_CPU_CAPABILITY=default): saliency 1.7e-15 / 9.0e-16, input × gradient
    # 2.7e-15 / 1.5e-15
    x = images()
    ref = captum_attr.Saliency(vit).attribute(x.clone().requires_grad_(True), target=TARGET, abs=True)
    ours = explain(vit, x, method="saliency", target=TARGET)
    assert ours.token_map.shape == (3, 16, 16)
    assert rel_diff(ours.token_map, ref.amax(1)) <= SAME_FLOAT64  # max |.| over colour channels
    ref = captum_attr.InputXGradient(vit).attribute(x.clone().requires_grad_(True), target=TARGET)
    ours = explain(vit, x, method="input_x_gradient", target=TARGET)
    assert rel_diff(ours.token_map, ref.sum(1)) <= SAME_FLOAT64  # signed, summed over colour channels


@pytest.mark.parametrize("baseline", ["zeros", "black"])
def test_integrated_gradients_equals_captum(vit, baseline):
    # Captum's own Gauss-Legendre rule on both sides (its weights rounded to float32 alike, so that
    # rounding cancels); measured 6.4e-16 / 1.7e-15 (zeros), 8.0e-16 / 5.0e-16 (black)
    x = images()
    mean = torch.tensor(vit.pretrained_cfg["mean"], dtype=torch.float64)
    std = torch.tensor(vit.pretrained_cfg["std"], dtype=torch.float64)
    base = torch.zeros_like(x) if baseline == "zeros" else (-mean / std)[None, :, None, None].expand_as(x)
    ref = captum_attr.IntegratedGradients(vit).attribute(
        x.clone(), baselines=base.contiguous(), target=TARGET, n_steps=20, method="gausslegendre")
    ours = explain(vit, x, method="integrated_gradients", target=TARGET, baseline=baseline)
    assert rel_diff(ours.token_map, ref.sum(1)) <= SAME_FLOAT64


def test_smoothgrad_equals_captum_noise_tunnel_on_our_noise(vit):
    # our noise (per-sample generator seeded by the sample's content, σ = 0.15 × its range) from
    # SmoothGrad.noise, then Captum's NoiseTunnel(Saliency, "smoothgrad"), max over colour channels;
    # measured 9.8e-16 / 7.7e-16
    x = images()
    eps = get_method("smoothgrad")().noise(x, types.SimpleNamespace(pixels=True, inputs=x))
    assert eps.shape == (3, 20, 3, 16, 16)
    with our_noise(eps):
        ref = captum_attr.NoiseTunnel(captum_attr.Saliency(vit)).attribute(
            x.clone().requires_grad_(True), nt_type="smoothgrad", nt_samples=20, target=TARGET, abs=True)
    ours = explain(vit, x, method="smoothgrad", target=TARGET)
    assert rel_diff(ours.token_map, ref.amax(1)) <= SAME_FLOAT64


# -- 1b. Captum on Hugging Face BERT, at the embedding output ---------------------------------------------
@pytest.fixture(scope="module")
def bert():
    return make_tiny_bert()


TEXT_TARGET = torch.tensor([1, 0, 2])


def hf_forward(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def hf_from_embedding(model):
    """Hugging Face's own forward with the embedding module's output replaced by `h` (our input space
    for text): what IntegratedGradients and NoiseTunnel integrate over."""
    def forward(h, ids, mask):
        handle = model.bert.embeddings.register_forward_hook(lambda m, a, out: h)
        try:
            return model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
    return forward


def test_text_saliency_and_input_x_gradient_equal_captum_layer_attribution(bert):
    # Captum's LayerGradientXActivation on `bert.embeddings` (its own layer hooks, HF's own forward):
    # the layer gradient (multiply_by_inputs=False) for saliency, h ⊙ gradient for input × gradient;
    # summed over hidden units; padding scores 0 on both sides. Measured: saliency 3.4e-16 / 2.1e-16,
    # input × gradient 3.9e-16 / 5.8e-16
    ids, mask = make_text_batch(3)
    batch = {"input_ids": ids, "attention_mask": mask}
    grad = captum_attr.LayerGradientXActivation(hf_forward(bert), bert.bert.embeddings, multiply_by_inputs=False
                                                ).attribute(ids, target=TEXT_TARGET, additional_forward_args=(mask,))
    ours = explain(bert, batch, method="saliency", target=TEXT_TARGET)
    assert ours.token_map.shape == (3, 7)
    assert rel_diff(ours.token_map, grad.abs().sum(-1)) <= SAME_FLOAT64
    assert (ours.token_map[mask == 0] == 0).all()
    gxa = captum_attr.LayerGradientXActivation(hf_forward(bert), bert.bert.embeddings).attribute(
        ids, target=TEXT_TARGET, additional_forward_args=(mask,))
    ours = explain(bert, batch, method="input_x_gradient", target=TEXT_TARGET)
    assert rel_diff(ours.token_map, gxa.sum(-1)) <= SAME_FLOAT64


def test_text_integrated_gradients_and_smoothgrad_equal_captum(bert):
    # IntegratedGradients over HF's forward from the embedding output, zero baseline there (Captum's
    # LayerIntegratedGradients takes its baseline as token ids, so it cannot start from a zero
    # embedding); NoiseTunnel(Saliency) on our noise (valid tokens only). Measured: IG 3.1e-16 / 3.1e-16,
    # SmoothGrad 4.3e-16 / 2.9e-16
    ids, mask = make_text_batch(3)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        h = bert.bert.embeddings(input_ids=ids)
    f = hf_from_embedding(bert)
    ref = captum_attr.IntegratedGradients(f).attribute(
        h.clone(), baselines=torch.zeros_like(h), target=TEXT_TARGET, additional_forward_args=(ids, mask),
        n_steps=20, method="gausslegendre")
    ours = explain(bert, batch, method="integrated_gradients", target=TEXT_TARGET)
    assert rel_diff(ours.token_map, ref.sum(-1)) <= SAME_FLOAT64

    samples = [i[m.bool()] for i, m in zip(ids, mask)]  # our seed: each text's unpadded ids
    eps = get_method("smoothgrad")().noise(samples, types.SimpleNamespace(pixels=False, inputs=h, valid=mask.bool()))
    assert eps.shape == (3, 20, 7, 16) and (eps[1, :, 4:] == 0).all() and (eps[1, :, :4] != 0).all()
    with our_noise(eps):
        ref = captum_attr.NoiseTunnel(captum_attr.Saliency(f)).attribute(
            h.clone().requires_grad_(True), nt_type="smoothgrad", nt_samples=20, target=TEXT_TARGET, abs=True,
            additional_forward_args=(ids, mask))
    ours = explain(bert, batch, method="smoothgrad", target=TEXT_TARGET)
    assert rel_diff(ours.token_map, ref.sum(-1)) <= SAME_FLOAT64


# -- 2. CP-LRP against lxt 2.1 ----------------------------------------------------------------------------
# lxt 2.1's CP-LRP for vision is the patch map `lxt.efficient.models.vit_torch.cp_LRP`, for
# torchvision's ViT (its only vision model; our package reads that ViT through its timm-layout
# canonizer). It patches, *globally*, torch.nn.MultiheadAttention.forward (query and key detached, so
# no gradient reaches the softmax: the attention probabilities are constants), torch.nn.LayerNorm.forward
# (σ = sqrt(Var + eps) detached, the centring kept: our default detach_mean=False) and
# torch.nn.GELU.forward (AttnLRP's identity rule, as the modified gradient gelu(x)/(x + 1e-10)).
# The map is then Gradient × Input at the pixels, as ours (seed 1 on the target logit).
#
# `import lxt.efficient` fails with transformers 5 (its package __init__ imports lxt's copies of
# HF's BERT/Llama/... modelling files, which need `transformers.modeling_attn_mask_utils`). The
# vit_torch map and lxt's `monkey_patch` need none of that, so lxt's files are imported here under
# stand-in package modules, and every patched class and module is restored afterwards.
def tv_vit(act=None, seed=0):
    """A tiny torchvision ViT in float64 with spread weights; `act` replaces the MLPs' GELU."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if ".ln" in name and name.endswith("weight")
                    else 0.5 * torch.randn_like(p))
    if act is not None:
        for layer in model.encoder.layers:
            layer.mlp[1] = act()
    return model.double().eval()


@contextlib.contextmanager
def lxt_cp_lrp(without=(), identity_epsilon=None):
    """lxt's CP-LRP patches applied by lxt's own `monkey_patch(vision_transformer)`, minus the classes
    in `without`; `identity_epsilon` overrides the identity rule's 1e-10 (a diagnostic)."""
    lxt = pytest.importorskip("lxt")
    from torchvision.models import vision_transformer

    root = Path(lxt.__file__).parent / "efficient"
    modules = {k: v for k, v in sys.modules.items() if k == "lxt.efficient" or k.startswith("lxt.efficient.")}
    classes = {cls: dict(vars(cls)) for cls in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    for name, path in (("lxt.efficient", root), ("lxt.efficient.models", root / "models")):
        stand_in = types.ModuleType(name)
        stand_in.__path__ = [str(path)]
        sys.modules[name] = stand_in
    try:
        from lxt.efficient.models import vit_torch

        patch_map = {cls: patch for cls, patch in vit_torch.cp_LRP.items() if cls not in without}
        # lxt's DEFAULT_MAP entry for torchvision's ViT (the other entries are the HF models)
        sys.modules["lxt.efficient.models"].get_default_map = {vision_transformer: patch_map}.__getitem__
        from lxt.efficient import patches, rules
        from lxt.efficient.core import monkey_patch

        if identity_epsilon is not None:
            def identity(fn, x):  # lxt's rule with its ε (forward's third argument) replaced
                return rules.identity_rule_implicit_fn.apply(fn, x, identity_epsilon)

            patches.identity_rule_implicit = identity  # looked up by patches.non_linear_forward at call time
        monkey_patch(vision_transformer)
        yield
    finally:
        for cls, saved in classes.items():
            for key in set(vars(cls)) - set(saved):
                delattr(cls, key)
            cls.forward = saved["forward"]
        for key in [k for k in sys.modules if k == "lxt.efficient" or k.startswith("lxt.efficient.")]:
            del sys.modules[key]
        sys.modules.update(modules)


def lxt_map(model, x, target, **kw):
    x = x.clone().requires_grad_(True)
    with lxt_cp_lrp(**kw):
        logits = model(x)
        logits.gather(1, target[:, None]).sum().backward()
    return (x * x.grad).sum(1).detach(), logits.detach()


TV_TARGET = torch.tensor([0, 2, 4])


def test_lxt_patches_are_undone():
    """lxt patches torch.nn's classes for the whole process: after each use the originals are back
    (the other tests in the session run unpatched) and no stand-in module is left in sys.modules."""
    forwards = {cls: cls.forward for cls in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    before = {k: v for k, v in sys.modules.items() if k.startswith("lxt.efficient")}
    lxt_map(tv_vit(), images(1), TV_TARGET[:1])
    assert all(cls.forward is f and not hasattr(cls, "original_forward") for cls, f in forwards.items())
    assert {k: v for k, v in sys.modules.items() if k.startswith("lxt.efficient")} == before


def test_cp_lrp_equals_lxt_on_a_relu_vit():
    """Where the definitions agree, (1): a ViT whose MLP activation is ReLU. lxt's map patches nn.GELU
    only, so ReLU keeps its derivative; that is also what the identity rule gives in Gradient × Input
    (ReLU(x)/x = 1[x > 0] = ReLU'(x)), and what our cp_lrp does (activations keep their derivative).
    Both sides are then the gradient of the same detached forward: bound 1e-12, measured 6.9e-16
    (native) / 6.2e-16 (ATEN_CPU_CAPABILITY=default)."""
    model = tv_vit(nn.ReLU)
    x = images()
    ref, logits = lxt_map(model, x, TV_TARGET)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)  # lxt's forward is the model's
    ours = explain(model, x, method="cp_lrp", target=TV_TARGET)
    torch.testing.assert_close(ours.logits, logits, rtol=1e-12, atol=1e-12)
    assert rel_diff(ours.token_map, ref) <= 1e-12


def test_cp_lrp_on_gelu_equals_lxt_without_its_gelu_rule_and_libragrad_with_it():
    """On a GELU ViT the two CP-LRPs differ in one rule only: Ali et al. 2022 (ours) keep GELU's
    derivative; lxt applies AttnLRP's identity rule to it, gradient gelu(x)/(x + ε), ε = 1e-10.

    (a) lxt's patch map without its GELU entry (attention and LayerNorm as lxt does them) equals our
        cp_lrp: bound 1e-12, measured 1.0e-15 (native) / 8.3e-16 (portable kernels).
    (b) lxt's full map equals our input_x_gradient with libragrad=true: LibraGrad's backward is
        CP-LRP's two detaches plus GELU's gate Φ(x) held constant, and gelu(x)/x = Φ(x) exactly, so
        the two differ only by lxt's ε: a relative change ε/|x| per GELU input (the smallest |x| here
        is 1.1e-3, so up to 1e-7 per unit), measured 2.1e-9 on the map (both kernel sets), bound 1e-6;
        with lxt's ε set to 0 the difference is rounding: measured 8.6e-16 / 6.3e-16, bound 1e-12.
    (c) the measured size of the difference between lxt's CP-LRP and ours on this GELU ViT (not
        asserted equal): 0.233 of the map's largest entry (both kernel sets); asserted only to be
        > 1e-2, so that the test notices if the two ever coincide."""
    model = tv_vit()
    x = images()
    ours = explain(model, x, method="cp_lrp", target=TV_TARGET).token_map

    ref, _ = lxt_map(model, x, TV_TARGET, without=(nn.GELU,))
    assert rel_diff(ours, ref) <= 1e-12  # (a)

    full, _ = lxt_map(model, x, TV_TARGET)
    libra = explain(model, x, method="input_x_gradient", target=TV_TARGET, libragrad=True).token_map
    assert rel_diff(libra, full) <= 1e-6  # (b), lxt's ε = 1e-10
    exact, _ = lxt_map(model, x, TV_TARGET, identity_epsilon=0.0)
    assert rel_diff(libra, exact) <= 1e-12  # (b), ε = 0

    gap = rel_diff(ours, full)  # (c)
    print(f"cp_lrp vs lxt cp_LRP on a GELU ViT: max |difference| / max |lxt| = {gap:.3g}")
    assert gap > 1e-2
