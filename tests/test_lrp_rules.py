"""Each LRP rule on tiny hand-worked layers, and conservation of the ours rule set node by node."""
import pytest
import torch

import transexplain
from conftest import make_vit
from transexplain.lrp import OURS, CLASSIC, propagate, safe_divide
from transexplain.lrp.rules import AddProportional, AlphaOneBetaZero, BilinearHalved


def test_safe_divide_zero_and_sign():
    a = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.0, -2.0], dtype=torch.float64)
    out = safe_divide(a, b)
    assert out[0] == 0
    assert out[1] == pytest.approx(1 / (2 + 1e-9))
    assert out[2] == pytest.approx(1 / (-2 + 1e-9))


def test_alpha_one_beta_zero_by_hand():
    # x = [1, -2], W = [[3, -1], [-1, 2]]; output 0: contributions 1*3=3 (+), -2*-1=2 (-·-), output 1: -1 (dropped), -4 (dropped)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[3.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    ours = AlphaOneBetaZero(shared=True)(x, w, r)
    # output 0: shares 3/5 and 2/5; output 1: every contribution <= 0 -> nothing (degenerate case)
    torch.testing.assert_close(ours, torch.tensor([[0.6, 0.4]], dtype=torch.float64), rtol=1e-8, atol=1e-8)
    classic = AlphaOneBetaZero(shared=False)(x, w, r)
    # separate denominators: 3/3 and 2/2 -> relevance doubles
    torch.testing.assert_close(classic, torch.tensor([[1.0, 1.0]], dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_all_negative_contributions_give_zeros_not_nan():
    x = torch.tensor([[1.0, 1.0]])
    w = -torch.ones(3, 2)
    out = AlphaOneBetaZero(shared=True)(x, w, torch.ones(1, 3))
    assert torch.equal(out, torch.zeros(1, 2))


def test_add_rescaled_per_sample_by_hand():
    a = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
    ra, rb = AddProportional(rescale=True)(a, b, r)
    # sample 0: a share = [0.5, 1.5] (sum 2), b share = [0.5, -0.5] (sum 0) -> all of ΣR=2 to a, scaled by 2/2
    torch.testing.assert_close(ra[0], torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(rb[0], torch.zeros(2, dtype=torch.float64), atol=1e-8, rtol=0)
    # sample 1: a share = [0, 4] (sum 4), b share = [0, 0] -> a keeps 4
    torch.testing.assert_close(ra[1], torch.tensor([0.0, 4.0], dtype=torch.float64))
    ra_c, rb_c = AddProportional(rescale=False)(a, b, r)
    torch.testing.assert_close(rb_c[0], torch.tensor([0.5, -0.5], dtype=torch.float64))


def test_bilinear_halved_by_hand():
    a = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)  # 1x2
    b = torch.tensor([[[3.0], [4.0]]], dtype=torch.float64)  # 2x1, z = 3 + 8 = 11
    ra, rb = BilinearHalved()(a, b, torch.tensor([[[11.0]]], dtype=torch.float64))
    torch.testing.assert_close(ra, torch.tensor([[[1.5, 4.0]]], dtype=torch.float64))
    torch.testing.assert_close(rb, torch.tensor([[[1.5], [4.0]]], dtype=torch.float64))


def test_ours_conserves_relevance_node_by_node():
    model = make_vit(depth=3, seed=4)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    adapter = transexplain.as_adapter(model)
    trace = adapter.run(x, record=True)
    seed = torch.nn.functional.one_hot(trace.logits.argmax(-1), 5).double()
    checked = {"linear": 0, "matmul": 0, "add": 0, "pass": 0}

    def check(node, r_out, r_ins):
        if node.kind not in checked:
            return
        total_out = r_out.reshape(r_out.shape[0], -1).sum(1)
        parts = [ri.reshape(ri.shape[0], -1).sum(1) for ri in r_ins if ri is not None]
        total_in = sum(parts)
        # the α=1 rule loses the share of outputs whose positive contributions are all zero; random
        # dense layers have none, so the sums must agree to the stabiliser's order
        torch.testing.assert_close(total_in, total_out, rtol=1e-6, atol=1e-9)
        checked[node.kind] += 1

    propagate(trace.tape, trace.logits, seed, OURS, on_node=check)
    assert all(v > 0 for v in checked.values()), checked


def test_classic_is_not_conservative():
    model = make_vit(depth=2, seed=5)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    trace = transexplain.as_adapter(model).run(x, record=True)
    seed = torch.nn.functional.one_hot(trace.logits.argmax(-1), 5).double()
    ratios = []

    def watch(node, r_out, r_ins):
        if node.kind == "linear":
            ratios.append(float(r_ins[0].sum() / r_out.sum()))

    propagate(trace.tape, trace.logits, seed, CLASSIC, on_node=watch)
    assert max(ratios) > 1.2  # separate denominators inflate relevance, as the paper's baselines did
