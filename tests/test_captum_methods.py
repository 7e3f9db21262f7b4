"""The Captum gradient baselines against independent computations on tiny float64 models:
central finite differences of the raw timm / Hugging Face forward (not the adapter's recorded one),
a hand-written Gauss-Legendre loop for integrated gradients, a loop over the seeded noise for
SmoothGrad; plus completeness, batch invariance, degenerate images and the target option."""
import hashlib

import numpy as np
import pytest
import torch

from conftest import make_text_batch, make_tiny_bert, make_vit
from transexplain import explain

METHODS = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"]
FD_STEP = 1e-5  # central differences in float64: truncation ~h²·f''' ≈ 1e-10, rounding ~1e-16/h ≈ 1e-11
F32_ULP = 2.0 ** -24  # Captum 0.9.0 casts IG's quadrature weights to float32 (relative rounding ≤ 2^-24)


@pytest.fixture(scope="module")
def vit():
    return make_vit()


def images(n=3, scale=1.0, seed=3):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


def predicted(model, x):
    with torch.no_grad():
        return model(x).argmax(-1)


def fd_gradient(model, x, target):
    """∂y_t/∂x by central differences, one coordinate at a time (all perturbed copies in one batch)."""
    out = torch.empty_like(x)
    n = x[0].numel()
    eye = torch.eye(n, dtype=x.dtype).reshape(n, *x.shape[1:]) * FD_STEP
    with torch.no_grad():
        for i in range(len(x)):
            up = model(x[i] + eye)[:, target[i]]
            down = model(x[i] - eye)[:, target[i]]
            out[i] = ((up - down) / (2 * FD_STEP)).reshape(x.shape[1:])
    return out


def autograd_gradient(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return g


def test_saliency_is_the_finite_difference_gradient(vit):
    x = images()
    t = predicted(vit, x)
    ref = fd_gradient(vit, x, t).abs().amax(1)  # max over colour channels of |∂y_t/∂x|
    ours = explain(vit, x, method="saliency")
    assert torch.equal(ours.target, t)
    diff = (ours.token_map - ref).abs().max().item()
    assert ours.token_map.shape == (3, 16, 16)
    assert diff < 1e-6, diff


def test_input_x_gradient_is_x_times_the_finite_difference_gradient(vit):
    x = images()
    t = predicted(vit, x)
    ref = (x * fd_gradient(vit, x, t)).sum(1)
    diff = (explain(vit, x, method="input_x_gradient").token_map - ref).abs().max().item()
    assert diff < 1e-6, diff


def gauss_legendre_ig(model, x, baseline, target, steps):
    """IG by its definition: (x−x') ⊙ Σ_k w_k ∇f(x' + α_k (x−x')), nodes mapped from [-1, 1] to [0, 1].
    Also returns Σ_k w_k |(x−x') ⊙ ∇f_k|, which bounds the effect of Captum's float32 weights."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    total = torch.zeros_like(x)
    magnitude = torch.zeros_like(x)
    for a, w in zip((nodes + 1) / 2, weights / 2):
        g = autograd_gradient(model, baseline + float(a) * (x - baseline), target)
        total += float(w) * g
        magnitude += float(w) * (g * (x - baseline)).abs()
    return (x - baseline) * total, magnitude


@pytest.mark.parametrize("baseline", ["zeros", "black"])
def test_integrated_gradients_equals_a_gauss_legendre_loop(vit, baseline):
    x = images()
    t = predicted(vit, x)
    # vit_tiny's config: mean = std = 0.5, so a black pixel is (0 - 0.5) / 0.5 = -1 in every channel
    base = torch.zeros_like(x) if baseline == "zeros" else torch.full_like(x, -1.0)
    ref, magnitude = gauss_legendre_ig(vit, x, base, t, 20)
    ours = explain(vit, x, method="integrated_gradients", baseline=baseline).token_map
    allowed = F32_ULP * magnitude.sum(1) + 1e-12
    diff = (ours - ref.sum(1)).abs()
    assert (diff <= allowed).all(), (diff.max().item(), allowed.max().item())
    assert diff.max().item() < 1e-6


@pytest.mark.parametrize("steps", [20, 48])
def test_integrated_gradients_completeness(vit, steps):
    """Σ attributions = f(x) − f(x') up to the quadrature error. Gauss-Legendre is exact for
    polynomials of degree ≤ 2·steps−1; as an explicit bound we use the composite trapezoid rule's on
    the same node count, h²/12 · max|g''| (h = 1/(steps−1)), g(α) = d/dα f(x'+α(x−x')) sampled on a
    2001-point grid (its second differences, ×1.5 for the sampling), plus the float32 weight rounding.
    Inputs of scale 0.05 keep the random model's path smooth enough for the bound to be informative
    (at scale 1 max|g''| ≈ 1e5 and no 20-node rule is accurate)."""
    x = images(scale=0.05)
    t = predicted(vit, x)
    ours = explain(vit, x, method="integrated_gradients", steps=steps)
    with torch.no_grad():
        delta = (vit(x) - vit(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    _, magnitude = gauss_legendre_ig(vit, x, torch.zeros_like(x), t, steps)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    h = 1 / 2000
    for i in range(len(x)):
        path = grid[:, None, None, None] * x[i]
        g = (autograd_gradient(vit, path, t[i].expand(len(grid))) * x[i]).sum((1, 2, 3))
        g2 = ((g[2:] - 2 * g[1:-1] + g[:-2]) / h**2).abs().max().item()
        bound = 1.5 * g2 / (12 * (steps - 1) ** 2) + F32_ULP * magnitude[i].sum().item() + 1e-12
        gap = abs(ours.token_map[i].sum().item() - delta[i].item())
        assert gap <= bound, (i, gap, bound)


def test_smoothgrad_equals_a_loop_over_the_seeded_noise(vit):
    x = images(2)
    t = predicted(vit, x)
    samples, noise, seed = 5, 0.2, 7
    ref = []
    for i in range(len(x)):
        # the documented seed: sha256 of the image as float32 bytes, first 8 bytes little-endian, XOR seed
        digest = hashlib.sha256(x[i].float().numpy().tobytes()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") ^ seed)
        eps = torch.randn((samples, 3, 16, 16), generator=gen, dtype=torch.float64)
        sigma = noise * (x[i].max() - x[i].min())
        acc = torch.zeros_like(x[i])
        for k in range(samples):
            acc += fd_gradient(vit, (x[i] + sigma * eps[k])[None], t[i:i + 1])[0].abs()
        ref.append((acc / samples).amax(0))
    ours = explain(vit, x, method="smoothgrad", samples=samples, noise=noise, seed=seed, internal_batch_size=3)
    diff = (ours.token_map - torch.stack(ref)).abs().max().item()
    assert diff < 1e-6, diff
    other_seed = explain(vit, x, method="smoothgrad", samples=samples, noise=noise, seed=seed + 1)
    assert (other_seed.token_map - ours.token_map).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance(vit, method):
    x = images(4)
    t = predicted(vit, x)
    together = explain(vit, x, method=method, target=t)
    for i in range(len(x)):
        alone = explain(vit, x[i:i + 1], method=method, target=t[i:i + 1])
        assert (alone.token_map[0] - together.token_map[i]).abs().max().item() < 1e-10
        assert (alone.heatmap[0] - together.heatmap[i]).abs().max().item() < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_finite_on_black_and_constant_images(vit, method):
    black = torch.full((1, 3, 16, 16), -1.0, dtype=torch.float64)  # (0 - 0.5) / 0.5
    constant = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    zero = torch.zeros((1, 3, 16, 16), dtype=torch.float64)
    for x in (black, constant, zero):
        r = explain(vit, x, method=method)
        assert torch.isfinite(r.token_map).all() and torch.isfinite(r.heatmap).all()
        assert r.heatmap.min() >= 0 and r.heatmap.max() <= 1
    if method == "integrated_gradients":  # x = x': every attribution is (x − x') ⊙ ... = 0
        assert explain(vit, zero, method=method).token_map.abs().max() == 0


@pytest.mark.parametrize("method", METHODS)
def test_target_option_changes_the_map(vit, method):
    x = images(2)
    a = explain(vit, x, method=method, target=0)
    b = explain(vit, x, method=method, target=[1, 2])
    assert a.target.tolist() == [0, 0] and b.target.tolist() == [1, 2]
    assert (a.token_map - b.token_map).abs().amax((1, 2)).min().item() > 1e-6


def test_unknown_options_and_baselines_are_refused(vit):
    from transexplain.errors import UserError

    with pytest.raises(UserError, match="no option"):
        explain(vit, images(1), method="integrated_gradients", n_steps=5)
    with pytest.raises(UserError, match="baseline"):
        explain(vit, images(1), method="integrated_gradients", baseline="white")
    with pytest.raises(UserError, match="steps"):
        explain(vit, images(1), method="integrated_gradients", steps=0)


# -- text: gradients with respect to the embedding output ----------------------------------------------
def hf_logits_from_embedding(model, ids, mask, h):
    """Hugging Face's own forward with the embedding output replaced by `h`."""
    handle = model.bert.embeddings.register_forward_hook(lambda m, a, out: h)
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def test_text_gradients_on_the_embedding_output():
    model = make_tiny_bert()
    ids, mask = make_text_batch(2)
    with torch.no_grad():
        h = model.bert.embeddings(input_ids=ids)
        t = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    grad = torch.zeros_like(h)
    with torch.no_grad():
        for idx in np.ndindex(*h.shape):
            e = torch.zeros_like(h)
            e[idx] = FD_STEP
            up = hf_logits_from_embedding(model, ids, mask, h + e)[idx[0], t[idx[0]]]
            down = hf_logits_from_embedding(model, ids, mask, h - e)[idx[0], t[idx[0]]]
            grad[idx] = (up - down) / (2 * FD_STEP)
    valid = mask.double()
    batch = {"input_ids": ids, "attention_mask": mask}
    sal = explain(model, batch, method="saliency")
    ixg = explain(model, batch, method="input_x_gradient")
    assert sal.token_map.shape == (2, 7)
    assert (sal.token_map - grad.abs().sum(-1) * valid).abs().max().item() < 1e-6
    assert (ixg.token_map - (h * grad).sum(-1) * valid).abs().max().item() < 1e-6
    # padding does not change a text's map
    alone = explain(model, {"input_ids": ids[1:, :4], "attention_mask": mask[1:, :4]}, method="smoothgrad")
    together = explain(model, batch, method="smoothgrad")
    assert (alone.token_map[0] - together.token_map[1, :4]).abs().max().item() < 1e-10
    assert together.token_map[1, 4:].abs().max() == 0


def test_text_integrated_gradients_completeness():
    """Zero baseline in embedding space: Σ_tokens IG = f(h) − f(0). With a fresh BERT's zero biases the
    path is not smooth (a post-LN block is scale-invariant up to LayerNorm's eps, so f jumps between
    α = 0 and α ≈ 1e-6 and no quadrature sees the jump); with nonzero biases, as in trained models, it is
    smooth but steep: gap measured 3e-3 at 20 nodes, 4e-7 at 48, 1e-9 at 100 (the floor of Captum's
    float32 weights, 2^-24·|Δf| ≈ 1e-7); asserted to 1e-6 at 100 nodes."""
    model = make_tiny_bert()
    ids, mask = make_text_batch(2)
    r = explain(model, {"input_ids": ids, "attention_mask": mask}, method="integrated_gradients", steps=100)
    with torch.no_grad():
        h = model.bert.embeddings(input_ids=ids)
        delta = (hf_logits_from_embedding(model, ids, mask, h)
                 - hf_logits_from_embedding(model, ids, mask, torch.zeros_like(h))).gather(1, r.target[:, None])[:, 0]
    gap = (r.token_map.sum(-1) - delta).abs().max().item()
    assert gap < 1e-6
    assert delta.abs().min().item() > 1e-4  # not vacuous


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_a_given_target_reuses_captums_forward(vit, method, monkeypatch):
    """With the class given, saliency and input x gradient run one forward (Captum's, on the clean
    inputs) and return its logits: the same map, target and logits as with the class found by a
    separate forward; a class out of range is still refused in one sentence."""
    from transexplain.errors import UserError
    from transexplain.models.vit import ViTAdapter

    x = images(3)
    pred = predicted(vit, x)
    free = explain(vit, x, method=method)  # target None: a no-grad forward picks the class first
    calls = []
    run = ViTAdapter.run
    monkeypatch.setattr(ViTAdapter, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    given = explain(vit, x, method=method, target=pred)
    assert len(calls) == 1
    assert torch.equal(given.target, free.target)
    assert torch.equal(given.token_map, free.token_map)
    with torch.no_grad():
        assert (given.logits - vit(x)).abs().max().item() < 1e-12
    with pytest.raises(UserError, match="out of range"):
        explain(vit, x, method=method, target=99)
    with pytest.raises(UserError, match="targets for 3 images"):
        explain(vit, x, method=method, target=[0, 1])


# -- rows per gradient pass: memory only ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_rows_per_pass_bound_the_passes_and_not_the_map(vit, method, monkeypatch):
    """`internal_batch_size` (explicit, or "auto": the budget over the graph bytes per row) caps the
    rows of every forward Captum runs -- below the batch too, the samples then go in groups -- and
    never changes the map."""
    import transexplain.api
    from transexplain.errors import UserError
    from transexplain.explainers import captum_methods as cm
    from transexplain.explainers import memory
    from transexplain.models.vit import ViTAdapter

    x = images(5)
    whole = explain(vit, x, method=method, internal_batch_size=1000).token_map  # every row in one pass
    monkeypatch.setattr(transexplain.api, "rows_per_call", lambda adapter, x: len(x))  # one explainer call
    widths = []
    run = ViTAdapter.run
    monkeypatch.setattr(ViTAdapter, "run", lambda self, inp, *a, **k: widths.append(len(inp)) or run(self, inp, *a, **k))

    def passes():  # the rows of each gradient pass (the first forward finds the class, on all 5 images)
        assert widths[0] == 5
        return widths[1:]

    for rows in (1, 2, 3, 7):
        widths.clear()
        got = explain(vit, x, method=method, internal_batch_size=rows).token_map
        assert (got - whole).abs().max().item() < 1e-12
        assert passes() and max(passes()) <= rows
    per_row = 12345  # "auto": rows = budget // bytes per row (the probe itself: the next test)
    monkeypatch.setattr(cm, "graph_bytes_per_row", lambda wrapped: per_row)
    for budget_rows in (1, 2, 4):
        monkeypatch.setattr(memory, "CPU_GRAPH_BUDGET", budget_rows * per_row + per_row // 2)
        widths.clear()
        got = explain(vit, x, method=method).token_map
        assert (got - whole).abs().max().item() < 1e-12
        assert max(passes()) <= budget_rows
        assert method == "integrated_gradients" or max(passes()) == budget_rows  # SmoothGrad fills each pass
    from transexplain.explainers import get_method

    for bad in (0, -2, "many", True, 2.5):
        with pytest.raises(UserError, match="internal_batch_size"):
            explain(vit, x, method=method, internal_batch_size=bad)
        with pytest.raises(UserError, match="internal_batch_size"):  # when the method is set up (--option)
            get_method(method)(internal_batch_size=bad)


def test_graph_bytes_per_row_counts_the_rows_not_the_weights(vit):
    """The per-row figure is what each row adds: the saved bytes of 3 rows exceed those of 1 row by
    twice it (to 5%: a few saved tensors share one storage at one row and not at more, measured 2.7%
    on this ViT; the figure only sizes the passes), and what 1 row saves beyond it (shared by every pass) holds at least the weights
    of the linear layers, which their backward keeps; a hand count of the attention probabilities alone
    (heads x N x N per block, float64, kept for A·V's backward) is a lower bound."""
    from transexplain.explainers import captum_methods as cm
    from transexplain.explainers import memory
    from transexplain.models import as_adapter

    adapter = as_adapter(vit)
    wrapped = cm._CaptumInput(adapter, images(3))
    memory._ROW_BYTES.clear()
    per_row = cm.graph_bytes_per_row(wrapped)

    def saved(rows):  # rows copies of the first image through the model
        first = images(1)
        return memory.saved_bytes(lambda inp: adapter.run(inp).logits,
                                  lambda r: first.expand(r, *first.shape[1:]).clone().requires_grad_(True), rows)

    assert abs((saved(3) - saved(1)) / (2 * per_row) - 1) < 0.05
    linear_weights = sum(m.weight.numel() * 8 for m in vit.modules() if isinstance(m, torch.nn.Linear))
    assert saved(1) - per_row >= linear_weights
    blocks, heads = len(vit.blocks), vit.blocks[0].attn.num_heads
    n = 1 + (16 // vit.patch_embed.patch_size[0]) ** 2
    assert per_row >= blocks * heads * n * n * 8
