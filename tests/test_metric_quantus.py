"""The suite's metrics against Quantus 0.6.0 and Captum 0.9.0 on the same maps and the same model.

Where a definition differs the test says how, and docs/metrics.md ("The metric suite") records it.
The tiny ViT has one input channel: Quantus broadcasts a (B, 1, H, W) map over the channels and
ranks every input value, so with three channels its ranking would mix channels (docs/metrics.md).
"""
import warnings

import numpy as np
import pytest
import torch

from conftest import make_vit
from transexplain.evaluation.metrics import curves, localisation, road, robustness, sanity

quantus = pytest.importorskip("quantus")


class AsDouble(torch.nn.Module):
    """Quantus hands a PyTorch model float32 inputs; the float64 model gets them back as float64."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double())


def _maps_without_ties(b, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(b * h * w).reshape(b, h, w).astype(np.float64) / (b * h * w)


@pytest.fixture(scope="module")
def setup():
    model = make_vit(img=(16, 16), in_chans=1, classes=3, seed=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    maps = _maps_without_ties(6, 16, 16)
    masks = np.zeros((6, 16, 16), dtype=np.int64)
    for i in range(6):
        masks[i, 2 + i:9 + i, 3:11] = 1
    return model, x, y, maps, masks


def _probs(model, inputs):
    with torch.no_grad():
        return torch.softmax(model(inputs), -1)


def test_localisation_matches_quantus(setup):
    model, x, y, maps, masks = setup
    kw = dict(normalise=False, abs=False, disable_warnings=True)
    args = dict(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None], s_batch=masks[:, None])
    for ours, theirs in ((localisation.pointing_game, quantus.PointingGame(**kw)),
                         (localisation.relevance_mass_accuracy, quantus.RelevanceMassAccuracy(**kw)),
                         (localisation.relevance_rank_accuracy, quantus.RelevanceRankAccuracy(**kw))):
        q = np.array(theirs(**args), dtype=np.float64)
        # same definitions on maps without ties and >= 0: equal to the last bit
        assert np.abs(ours(maps, masks) - q).max() == 0.0, type(theirs).__name__


def test_deletion_curve_matches_quantus_pixel_flipping(setup):
    model, x, y, maps, _ = setup
    x = x.float().double()  # the values Quantus' float32 copy holds
    steps = 8                                 # 256 pixels, 32 per step
    q = quantus.PixelFlipping(features_in_step=32, perturb_baseline=0.0, normalise=False, abs=False,
                              disable_warnings=True)(model=AsDouble(model).eval(), x_batch=x.numpy(),
                                                     y_batch=y.numpy(), a_batch=maps[:, None], softmax=True)
    copies = curves.deletion_inputs(x, torch.from_numpy(maps), torch.zeros(1, 1, 1, dtype=torch.float64), steps)
    probs = _probs(model, copies.reshape(-1, 1, 16, 16)).view(6, steps + 1, -1)
    ours = probs[torch.arange(6), :, y].numpy()
    # Quantus' curve leaves out the clean image (our point 0) and starts after the first step
    assert np.abs(ours[:, 1:] - np.array(q)).max() < 1e-12


def test_road_matches_quantus(setup):
    model, x, y, maps, _ = setup
    x = x.float().double()
    percentages = [10, 30, 50, 70, 90]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True, display_progressbar=False)(
            model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None], softmax=True)
    fractions = [p / 100 for p in percentages]
    copies = road.road_inputs(x, torch.from_numpy(maps), fractions, most_first=True, noise=0.0, method="block")
    pred = _probs(model, copies.reshape(-1, 1, 16, 16)).argmax(-1).view(6, len(fractions))
    ours = road.road_accuracy((pred == y.view(-1, 1)).numpy())
    # Quantus reports the accuracy per percentage (MoRF); with noise 0 the imputations agree
    assert np.abs(ours - np.array([q[p] for p in percentages])).max() == 0.0


def test_imputation_matches_quantus_imputer(setup):
    _, x, _, maps, _ = setup
    from quantus.functions.perturb_func import noisy_linear_imputation

    masks = road.road_masks(torch.from_numpy(maps), (0.3, 0.8), most_first=False)
    for i in range(3):
        for f in range(2):
            idx = np.flatnonzero(masks[i, f].numpy().reshape(-1))
            q = noisy_linear_imputation(x[i].numpy(), idx, noise=0.0)
            ours = road.noisy_linear_impute(x[i:i + 1], masks[i:i + 1, f], noise=0.0, method="block")[0].numpy()
            assert np.abs(ours - q).max() < 1e-12


def test_infidelity_matches_captum(setup):
    from captum.metrics import infidelity as captum_infidelity

    model, x, y, maps, _ = setup
    samples = 4
    drawn = []

    def perturb(inputs):
        gen = torch.Generator().manual_seed(len(drawn))
        noise = 0.1 * torch.randn(inputs.shape, generator=gen, dtype=inputs.dtype)
        drawn.append((noise, inputs))
        return noise, inputs - noise

    forward = lambda inp: torch.softmax(model(inp), -1)  # noqa: E731
    attributions = torch.from_numpy(maps).unsqueeze(1)
    for normalize in (False, True):
        drawn.clear()
        theirs = captum_infidelity(forward, perturb, x, attributions, target=y, n_perturb_samples=samples,
                                   max_examples_per_batch=None, normalize=normalize).numpy()
        noise, expanded = drawn[0]
        # Captum repeats each example n_perturb_samples times in a row (repeat_interleave)
        assert torch.equal(expanded, x.repeat_interleave(samples, 0))
        pert = noise.view(6, samples, 1, 16, 16)
        p_clean = _probs(model, x)[torch.arange(6), y].numpy()
        p_pert = _probs(model, (x.unsqueeze(1) - pert).reshape(-1, 1, 16, 16)).view(6, samples, -1)
        p_pert = p_pert[torch.arange(6), :, y].numpy()
        ours = robustness.infidelity(maps, pert, p_clean, p_pert, normalize=normalize)
        assert np.abs(ours - theirs).max() <= 1e-12 * max(1.0, np.abs(theirs).max())


def test_max_sensitivity_matches_captum(setup):
    from captum.metrics import sensitivity_max

    model, x, y, maps, _ = setup
    samples = 5
    gen = torch.Generator().manual_seed(0)
    perturbed = robustness.sensitivity_perturbations(x, samples, 0.02, gen)     # (6, 5, 1, 16, 16)
    queue = [perturbed.reshape(-1, 1, 16, 16)]

    def perturb(inputs, perturb_radius=0.02):
        # Captum repeats each example n_perturb_samples times in a row (repeat_interleave)
        return queue[0]

    def explain(inp):
        # a fixed smooth "explanation": the squared input (any function of the input will do)
        # returned as a tuple: Captum 0.9 tuplizes only the perturbed explanations, and iterates a bare
        # tensor of the clean ones row by row (a wrong norm)
        inp = inp[0] if isinstance(inp, tuple) else inp
        return (inp ** 2,)

    theirs = sensitivity_max(explain, x, perturb_func=perturb, n_perturb_samples=samples,
                             max_examples_per_batch=6 * samples).numpy()
    ours = robustness.max_sensitivity((x ** 2)[:, 0], (perturbed ** 2)[:, :, 0])
    assert np.abs(ours - theirs).max() < 1e-12


def test_spearman_matches_quantus_similarity(setup):
    from quantus.functions.similarity_func import correlation_spearman

    _, _, _, maps, _ = setup
    rng = np.random.default_rng(1)
    other = rng.random((1, 6, 16, 16))
    ours = sanity.spearman(maps, other)[0]
    theirs = np.array([correlation_spearman(maps[i].reshape(-1), other[0, i].reshape(-1)) for i in range(6)])
    assert np.abs(ours - theirs).max() < 1e-14
