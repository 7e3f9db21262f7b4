"""Swin Transformer support: exact recorded forward, token-space operators, method properties."""
import pytest
import torch

import transexplain
from transexplain.explainers import get_method, method_names
from transexplain.lrp import OURS, propagate
from transexplain.models import as_adapter
from transexplain.models.swin import SwinAdapter, _to_windows

# every method that can run on Swin (a class-token method is refused there: tests/test_support_matrix.py)
ALL = sorted(m for m in method_names() if "class_token" not in get_method(m).needs)
CLASS_SPECIFIC = ["gradcam", "generic_attention", "transformer_attribution", "partial_lrp", "full_lrp", "ln_stats"]


def make_swin(img=56, patch=4, embed=24, depths=(2, 2), heads=(2, 4), window=7, classes=5, seed=0,
              dtype=torch.float64, spread=True):
    """A small random-weight Swin: 14x14 then 7x7 tokens for img=56/patch=4; stage 1 is shifted."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=img, patch_size=patch, window_size=window,
        embed_dim=embed, depths=depths, num_heads=heads, num_classes=classes, drop_path_rate=0.0,
    )
    if spread:  # weights spread enough to make attention peaked and the classes distinct
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif "relative_position_bias_table" in name:
                    p.copy_(0.5 * torch.randn_like(p))
                else:
                    p.copy_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return make_swin()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(4, 3, 56, 56, dtype=torch.float64)


def test_structure_and_logits(model, batch):
    adapter = as_adapter(model)
    assert isinstance(adapter, SwinAdapter)
    assert adapter.num_blocks == 4 and adapter.stage_res == [(14, 14), (7, 7)]
    assert [b.shift_size for _, b in adapter.blocks] == [(0, 0), (3, 3), (0, 0), (0, 0)]  # 7x7 grid: no shift
    trace = adapter.run(batch, record=True)
    torch.testing.assert_close(trace.logits, model(batch), rtol=1e-10, atol=1e-10)
    assert [tuple(a.shape) for a in trace.attentions] == [(16, 2, 49, 49)] * 2 + [(4, 4, 49, 49)] * 2
    mu, sigma = trace.extras["ln_stats"][1]
    assert mu.shape == sigma.shape == (4, 196) and (sigma > 0).all()
    # float32 too (the model's own dtype)
    m32 = make_swin(dtype=torch.float32)
    x32 = batch.float()
    torch.testing.assert_close(as_adapter(m32).run(x32).logits, m32(x32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ALL)
def test_runs_finite_and_shaped(model, batch, method):
    for x in (batch[:2], torch.zeros(1, 3, 56, 56, dtype=torch.float64)):
        e = transexplain.explain(model, x, method)
        expected = (56, 56) if transexplain.explainers.get_method(method).pixel_level else (14, 14)
        assert tuple(e.token_map.shape[1:]) == expected
        assert torch.isfinite(e.token_map).all() and torch.isfinite(e.heatmap).all()
        assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1


@pytest.mark.parametrize("method", ALL)
def test_batch_invariance_and_determinism(model, batch, method):
    together = transexplain.explain(model, batch, method)
    again = transexplain.explain(model, batch, method)
    torch.testing.assert_close(again.token_map, together.token_map, rtol=0, atol=0)
    for i in (0, 3):
        alone = transexplain.explain(model, batch[i:i + 1], method)
        scale = together.token_map[i].abs().max().item()
        torch.testing.assert_close(alone.token_map[0], together.token_map[i], rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(alone.heatmap[0], together.heatmap[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", CLASS_SPECIFIC)
def test_class_specific(model, batch, method):
    x = batch[:2]
    a = transexplain.explain(model, x, method, target=0)
    b = transexplain.explain(model, x, method, target=3)
    assert not torch.allclose(a.token_map, b.token_map, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("variant", ["key_sigma", "key_inv_sigma", "query_sigma", "key_snr", "map_sigma", "map_inv_sigma"])
def test_ln_stats_variants(model, batch, variant):
    e = transexplain.explain(model, batch[:2], "ln_stats", variant=variant)
    assert torch.isfinite(e.token_map).all() and (e.token_map >= 0).all()


def test_ln_stats_runs_on_vit():
    from conftest import make_vit

    vit = make_vit(depth=2)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    trace = as_adapter(vit).run(x)
    torch.testing.assert_close(trace.logits, vit(x))
    assert len(trace.extras["ln_stats"]) == 2 and trace.extras["ln_stats"][0][1].shape == (2, 17)
    for variant in ("key_inv_sigma", "query_sigma", "map_sigma"):
        e = transexplain.explain(vit, x, "ln_stats", variant=variant)
        assert e.token_map.shape == (2, 4, 4) and torch.isfinite(e.token_map).all()


def test_ours_rule_set_conserves_relevance_node_by_node(model, batch):
    """linear (α=1,β=0 shared), add (rescaled per sample) and matmul (halved ×2) are conservative.

    Each of these rules returns Σ R_in = Σ R_out exactly in exact arithmetic; what separates them
    in float64 is the 1e-9 stabiliser in safe_divide (relative effect ~1e-9/|z| per entry) and
    round-off, so we allow 1e-6 of the total absolute relevance of the node.
    """
    adapter = as_adapter(model)
    x = batch[:2]
    trace = adapter.run(x, record=True)
    seed = torch.nn.functional.one_hot(trace.logits.argmax(-1), trace.logits.shape[-1]).to(x.dtype)
    seen = {"linear": 0, "add": 0, "matmul": 0}

    def check(node, r_out, r_ins):
        if node.kind not in seen:
            return
        seen[node.kind] += 1
        dims = tuple(range(1, r_out.dim()))
        n_b = x.shape[0]
        out = r_out.reshape(n_b, -1).sum(1) if r_out.shape[0] == n_b else r_out.sum().reshape(1)
        ins = 0
        for r in r_ins:
            ins = ins + (r.reshape(n_b, -1).sum(1) if r_out.shape[0] == n_b else r.sum().reshape(1))
        tol = 1e-6 * r_out.abs().sum() + 1e-12
        assert (ins - out).abs().max() <= tol, (node.kind, node.tag, ins, out)
        del dims

    propagate(trace.tape, trace.logits, seed, OURS, on_node=check)
    assert seen["linear"] > 10 and seen["matmul"] == 8 and seen["add"] >= 12


def test_conservation_from_logit_to_pixels_is_total(model, batch):
    """Relevance at the input of the whole network stays close to the seed's mass (1 per image)."""
    adapter = as_adapter(model)
    x = batch[:2]
    trace = adapter.run(x, record=True)
    seed = torch.nn.functional.one_hot(trace.logits.argmax(-1), trace.logits.shape[-1]).to(x.dtype)
    totals = []
    propagate(trace.tape, trace.logits, seed, OURS,
              on_node=lambda node, r, ri: totals.append(r.sum().item()) if node.kind == "conv_input" else None)
    assert len(totals) == 1 and 0 < totals[0] <= 2.0 + 1e-6


# --- the token-space operators ---------------------------------------------------------------
def _dense_block_matrix(adapter, block, mats, n_batch, sample):
    """The N x N matrix of block `block` for one sample, built entry by entry from the windows."""
    _, blk = adapter.blocks[block]
    gh, gw = adapter.block_grid(block)
    idx = torch.arange(gh * gw, dtype=torch.float64).reshape(1, gh, gw, 1).expand(n_batch, -1, -1, -1)
    win_idx = _to_windows(idx, blk.window_size, blk.shift_size).squeeze(-1).long()  # (B*nW, n) token ids
    n_win = win_idx.shape[0] // n_batch
    dense = torch.zeros(gh * gw, gh * gw, dtype=torch.float64)
    for w in range(sample * n_win, (sample + 1) * n_win):
        for i, ti in enumerate(win_idx[w].tolist()):
            for j, tj in enumerate(win_idx[w].tolist()):
                dense[ti, tj] += mats[w, i, j]
    return dense


@pytest.mark.parametrize("block", [0, 1, 2])
def test_mix_equals_dense_block_diagonal_after_roll(block):
    model = make_swin(img=56, patch=4)
    adapter = as_adapter(model)
    torch.manual_seed(block)
    n_batch = 2
    gh, gw = adapter.block_grid(block)
    n_win = (gh // 7) * (gw // 7) * n_batch
    mats = torch.rand(n_win, 49, 49, dtype=torch.float64)
    v = torch.rand(n_batch, gh * gw, dtype=torch.float64)
    got = adapter.mix(v, block, mats)
    for s in range(n_batch):
        dense = _dense_block_matrix(adapter, block, mats, n_batch, s)
        torch.testing.assert_close(got[s], v[s] @ dense)


def test_identity_through_shifted_block_and_one_hot_move():
    adapter = as_adapter(make_swin())
    block = 1
    assert adapter.blocks[block][1].shift_size == (3, 3)
    torch.manual_seed(0)
    v = torch.rand(1, 196, dtype=torch.float64)
    eye = torch.eye(49, dtype=torch.float64).expand(4, 49, 49)
    torch.testing.assert_close(adapter.mix(v, block, eye), v)
    # One-hot M in window 0 of the rolled grid: query at window position (0, 0), key at (2, 5).
    # Rolled grid position (r, c) is original token ((r + 3) % 14, (c + 3) % 14).
    mats = torch.zeros(4, 49, 49, dtype=torch.float64)
    mats[0, 0 * 7 + 0, 2 * 7 + 5] = 1.0
    v = torch.zeros(1, 196, dtype=torch.float64)
    v[0, 3 * 14 + 3] = 1.0  # the original token that sits at rolled (0, 0)
    out = adapter.mix(v, block, mats).reshape(14, 14)
    assert out[(2 + 3) % 14, (5 + 3) % 14] == 1.0 and out.sum() == 1.0
    # the corner token (13, 13) sits at rolled (10, 10): window 3, position (3, 3)
    mats = torch.zeros(4, 49, 49, dtype=torch.float64)
    mats[3, 3 * 7 + 3, 0] = 1.0  # to window 3 position (0, 0) = rolled (7, 7) = original (10, 10)
    v = torch.zeros(1, 196, dtype=torch.float64)
    v[0, 13 * 14 + 13] = 1.0
    out = adapter.mix(v, block, mats).reshape(14, 14)
    assert out[10, 10] == 1.0 and out.sum() == 1.0


def test_walk_across_patch_merging_preserves_mass():
    adapter = as_adapter(make_swin())
    torch.manual_seed(0)
    v = torch.rand(2, 49, dtype=torch.float64)  # on stage 2's 7x7 grid (block 2's output)
    eye = torch.eye(49, dtype=torch.float64).expand(8, 49, 49)
    down = adapter.mix(v, 1, eye)  # moved to the 14x14 grid of block 1 first
    assert down.shape == (2, 196)
    torch.testing.assert_close(down.sum(1), v.sum(1))
    grid = down.reshape(2, 14, 14)
    torch.testing.assert_close(grid[:, 2 * 3 + 1, 2 * 5], v.reshape(2, 7, 7)[:, 3, 5] / 4)
    # to_token_map moves a later-stage map to the stage-1 grid the same way
    torch.testing.assert_close(adapter.to_token_map(v), grid)


def test_start_layer_in_later_stage(model, batch):
    e = transexplain.explain(model, batch[:1], "transformer_attribution", start_layer=2)
    assert e.token_map.shape == (1, 14, 14) and torch.isfinite(e.token_map).all()
    # constant on each 2x2 group of children
    t = e.token_map[0]
    torch.testing.assert_close(t[0::2, 0::2], t[1::2, 1::2])


def corner_mass(token_map: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Share of (non-negative) map mass in the four corner windows, per sample."""
    t = token_map.clamp(min=0)
    w = window
    corners = t[:, :w, :w].sum((1, 2)) + t[:, :w, -w:].sum((1, 2)) + t[:, -w:, :w].sum((1, 2)) + t[:, -w:, -w:].sum((1, 2))
    return corners / t.sum((1, 2)).clamp(min=1e-30)


def test_corner_mass_is_measurable(model, batch):
    """Only what is robust: a share in [0, 1], and the 14x14 grid's corners are its whole area."""
    e = transexplain.explain(model, batch[:2], "transformer_attribution")
    share = corner_mass(e.token_map)
    assert torch.allclose(share, torch.ones_like(share))  # 14x14 = four 7x7 windows
    big = make_swin(img=112, patch=4, embed=16, depths=(2, 2), heads=(1, 2))
    x = torch.randn(1, 3, 112, 112, dtype=torch.float64)
    share = corner_mass(transexplain.explain(big, x, "transformer_attribution").token_map)
    assert 0 <= share.item() <= 1
