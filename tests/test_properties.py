"""Properties every explainer must have: batch invariance, determinism, finiteness, class specificity."""
import pytest
import torch

import transexplain
from conftest import make_vit
from transexplain.explainers import get_method, method_names

METHODS = method_names()
CLASS_SPECIFIC = [m for m in METHODS if get_method(m).class_specific]


@pytest.fixture(scope="module")
def model():
    return make_vit(depth=3, heads=2, dim=16, img=(16, 16), patch=4, classes=5, seed=0)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    return torch.randn(8, 3, 16, 16, dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance(model, batch, method):
    together = transexplain.explain(model, batch, method)
    for i in (0, 5):
        alone = transexplain.explain(model, batch[i:i + 1], method)
        torch.testing.assert_close(alone.token_map[0], together.token_map[i], rtol=1e-5, atol=1e-5 * together.token_map[i].abs().max().item())
        torch.testing.assert_close(alone.heatmap[0], together.heatmap[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(model, batch, method):
    a = transexplain.explain(model, batch[:3], method)
    b = transexplain.explain(model, batch[:3], method)
    assert torch.equal(a.token_map, b.token_map)


@pytest.mark.parametrize("precision", ["mixed", "float64", "float32"])
@pytest.mark.parametrize("method", METHODS)
def test_finite_and_normalised_even_on_black_image(method, precision):
    model = make_vit(depth=2, dtype=torch.float32, seed=1)
    black = torch.full((2, 3, 16, 16), -1.0)  # 0 in [0, 1] space after 0.5/0.5 normalisation
    res = transexplain.explain(model, torch.cat([black, torch.randn(1, 3, 16, 16)]), method, precision=precision)
    assert res.heatmap.dtype == (torch.float64 if precision == "mixed" else getattr(torch, precision))
    assert torch.isfinite(res.token_map).all() and torch.isfinite(res.heatmap).all()
    assert res.heatmap.min() >= 0 and res.heatmap.max() <= 1
    assert res.heatmap.shape == (3, 16, 16)
    # a map either spans [0, 1] or is reported empty (all zeros)
    for i in range(3):
        if res.empty[i]:
            assert res.heatmap[i].abs().max() == 0
        else:
            assert res.heatmap[i].max() == pytest.approx(1.0) and res.heatmap[i].min() == 0


@pytest.mark.parametrize("method", CLASS_SPECIFIC)
def test_class_specific(model, batch, method):
    a = transexplain.explain(model, batch[:2], method, target=0)
    b = transexplain.explain(model, batch[:2], method, target=3)
    assert (a.target == 0).all() and (b.target == 3).all()
    assert not torch.allclose(a.token_map, b.token_map)


def test_float32_agrees_with_float64_for_attention_methods(batch):
    m64 = make_vit(depth=3, seed=2)
    m32 = make_vit(depth=3, seed=2, dtype=torch.float32)
    for method in ("raw_attention", "rollout", "gradcam", "generic_attention"):
        a = transexplain.explain(m64, batch[:2], method).token_map
        b = transexplain.explain(m32, batch[:2].float(), method, precision="float32").token_map
        assert b.dtype == torch.float32 and a.dtype == torch.float64
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_default_target_is_prediction(model, batch):
    res = transexplain.explain(model, batch, "gradcam")
    assert torch.equal(res.target, model(batch).argmax(-1))
    assert torch.equal(res.target, res.logits.argmax(-1))


@pytest.mark.parametrize("method", METHODS)
def test_targets_given_as_int_or_list(model, batch, method):
    as_list = transexplain.explain(model, batch[:2], method, target=[1, 4])
    assert as_list.target.tolist() == [1, 4]
    as_int = transexplain.explain(model, batch[:2], method, target=2)
    assert as_int.target.tolist() == [2, 2]


@pytest.mark.parametrize("method", METHODS)
def test_a_target_predicted_under_inference_mode_is_accepted(model, batch, method):
    """The perturbation runner predicted its targets under torch.inference_mode; gradient methods
    computed with Captum then failed ("Inference tensors cannot be saved for backward")."""
    with torch.inference_mode():
        target = model(batch[:2]).argmax(-1)
    res = transexplain.explain(model, batch[:2], method, target=target)
    assert torch.equal(res.target, target.clone())


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_over_the_memory_budget_is_explained_in_calls_with_the_same_maps(model, batch, method, monkeypatch):
    """`api.explain` splits a batch into calls of as many rows as the graph budget allows (here 2 of
    5): every call gets at most that many rows, the targets follow their rows, and the maps, logits
    and classes are those of one call."""
    from transexplain.explainers import memory

    targets = [0, 3, 1, 4, 2]
    whole = transexplain.explain(model, batch[:5], method, target=targets)
    seen = []
    monkeypatch.setattr(memory, "rows_within_budget", lambda per_row, device: seen.append(per_row) or 2)
    cls = get_method(method)
    scores = cls.scores
    widths = []
    monkeypatch.setattr(cls, "scores", lambda self, adapter, x, target: widths.append(len(x)) or scores(self, adapter, x, target))
    split = transexplain.explain(model, batch[:5], method, target=targets)
    assert widths == [2, 2, 1] and seen and seen[0] > 1
    assert split.target.tolist() == targets
    scale = whole.token_map.abs().max().item()
    torch.testing.assert_close(split.token_map, whole.token_map, rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(split.logits, whole.logits, rtol=1e-12, atol=1e-12)
    predicted = transexplain.explain(model, batch[:5], method)  # the predicted class, chosen per call
    assert predicted.target.tolist() == whole.logits.argmax(-1).tolist()


def test_rows_per_call_keeps_the_forward_graph_under_the_budget(model, batch, monkeypatch):
    """The rows of a call times the measured bytes a row adds to the forward's saved tensors stay under
    the budget, and one more row would not: measured against the saved bytes of that many rows."""
    from transexplain.api import rows_per_call
    from transexplain.explainers import memory
    from transexplain.precision import adapter_at

    adapter = adapter_at(model, "float64")
    memory._ROW_BYTES.clear()
    monkeypatch.setattr(memory, "CPU_GRAPH_BUDGET", 1)
    assert rows_per_call(adapter, batch) == 1  # never below one row
    first = batch[:1]

    def saved(rows):
        return memory.saved_bytes(lambda x: adapter.run(x).logits,
                                  lambda r: first.expand(r, *first.shape[1:]).clone().requires_grad_(True), rows)

    per_row = saved(2) - saved(1)
    monkeypatch.setattr(memory, "CPU_GRAPH_BUDGET", 3 * per_row + per_row // 2)
    assert rows_per_call(adapter, batch) == 3
    assert saved(4) - saved(1) <= memory.CPU_GRAPH_BUDGET < saved(5) - saved(1)
    assert rows_per_call(adapter, batch[:1]) == 1
