"""A ViT whose patch embedding is a convolutional stem (the embedded model's architecture):
BatchNorm folding, the conv LRP rule against the linear rule on unfolded patches, conservation."""
import pytest
import torch
import torch.nn.functional as F

import transexplain
from conftest import make_vit
from transexplain.errors import UserError
from transexplain.lrp import OURS, CLASSIC, propagate
from transexplain.lrp.rules import AlphaOneBetaZero, ConvAlphaOneBetaZero
from transexplain.models.loading import add_conv_stem


def stem_vit(seed=0):
    model = make_vit(depth=2, seed=seed, img=(16, 16), patch=4)
    add_conv_stem(model, [6, 8])
    torch.manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial BatchNorm statistics so that folding matters
        for mod in model.patch_embed.proj:
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(0.3 * torch.randn_like(mod.running_mean))
                mod.running_var.copy_(0.5 + torch.rand_like(mod.running_var))
                mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.2 * torch.randn_like(mod.bias))
            elif isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(0.5 * torch.randn_like(mod.weight))
    return model.double().eval()


@pytest.mark.parametrize("shared", [True, False])
def test_conv_rule_equals_linear_rule_on_unfolded_patches(shared):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    r = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    got = ConvAlphaOneBetaZero(shared)(x, conv, r)
    # independent route: each output position is a linear layer over its 3x3x3 receptive field
    cols = F.unfold(x, 3, padding=1, stride=2)  # (B, 27, L)
    w = conv.weight.reshape(4, -1)
    per_pos = AlphaOneBetaZero(shared)(cols.transpose(1, 2), w, r.flatten(2).transpose(1, 2))  # (B, L, 27)
    want = F.fold(per_pos.transpose(1, 2), (7, 7), 3, padding=1, stride=2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_recorded_forward_with_folded_batchnorm_equals_the_model():
    model = stem_vit()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    trace = transexplain.as_adapter(model).run(x, record=True)
    torch.testing.assert_close(trace.logits, model(x), rtol=1e-9, atol=1e-9)
    kinds = [n.kind for n in trace.tape.nodes]
    assert kinds[0] == "conv_input" and kinds.count("conv") == 2


def test_ours_conserves_relevance_through_the_stem():
    model = stem_vit(seed=1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    trace = transexplain.as_adapter(model).run(x, record=True)
    seed = F.one_hot(trace.logits.argmax(-1), 5).double()
    seen = []

    def check(node, r_out, r_ins):
        if node.kind == "conv":
            # the α=1 rule keeps all relevance except that of outputs with no positive contribution
            # at all (after a ReLU, a 1x1 conv over all-zero channels); those are found here directly
            conv, xin = node.module, node.inputs[0].detach()
            kw = dict(stride=conv.stride, padding=conv.padding)
            z = F.conv2d(xin.clamp(min=0), conv.weight.clamp(min=0), **kw) + F.conv2d(xin.clamp(max=0), conv.weight.clamp(max=0), **kw)
            kept = torch.where(z > 0, r_out, torch.zeros_like(r_out))
            tin, tout = r_ins[0].reshape(2, -1).sum(1), kept.reshape(2, -1).sum(1)
            torch.testing.assert_close(tin, tout, rtol=1e-6, atol=1e-9)
            seen.append(bool((z > 0).all()))

    out = propagate(trace.tape, trace.logits, seed, OURS, on_node=check, input_tensor=trace.input)
    assert len(seen) == 2 and any(seen)  # at least one conv conserved everything
    assert out.input_relevance is not None and out.input_relevance.shape == x.shape
    classic = propagate(trace.tape, trace.logits, seed, CLASSIC, input_tensor=trace.input)
    assert torch.isfinite(classic.input_relevance).all()


@pytest.mark.parametrize("method", ["transformer_attribution", "full_lrp", "partial_lrp", "rollout", "gradcam"])
def test_every_method_runs_on_the_stem_model(method):
    model = stem_vit(seed=2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    maps = transexplain.explain(model, x, method=method).token_map
    assert maps.shape[0] == 2 and torch.isfinite(maps).all()
    assert maps.flatten(1).abs().sum(1).min() > 0


def test_a_stem_that_does_not_fit_the_patch_size_is_refused():
    model = make_vit(img=(16, 16), patch=4)
    with pytest.raises(UserError, match="stride-2"):
        add_conv_stem(model, [4, 4, 4])


def test_swin_with_a_conv_stem_records_the_same_forward_and_explains():
    from test_swin import make_swin

    model = make_swin(seed=3)
    add_conv_stem(model, [6, 8])
    model = model.double().eval()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    adapter = transexplain.as_adapter(model)
    assert adapter.input_size == (3, 56, 56)
    torch.testing.assert_close(adapter.run(x).logits, model(x), rtol=1e-9, atol=1e-9)
    maps = transexplain.explain(model, x, method="transformer_attribution").token_map
    assert maps.shape == (2, 14, 14) and torch.isfinite(maps).all()


def test_a_conv_stem_checkpoint_loads_through_the_user_path(tmp_path):
    import json

    from safetensors.torch import save_file

    from transexplain.models.loading import load_model

    model = stem_vit(seed=4).float()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 5, "conv_stem": [6, 8], "input_size": [3, 16, 16],
           "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.model(x), model(x))
