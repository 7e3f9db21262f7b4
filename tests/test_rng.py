"""transexplain.rng: counter-based draws, the same on every CPU kernel and device.

Expected values come from an independent computation: SplitMix64 written with Python's unbounded
integers (mod 2^64, Vigna's splitmix64.c), and Box-Muller written with Python's `math`."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from transexplain import rng
from transexplain.evaluation.metrics import _common

M64 = (1 << 64) - 1


def splitmix64(key: int, i: int) -> int:
    """The i-th (0-based) output of SplitMix64 seeded with key, in unbounded Python integers."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_reference_itself():
    """The Python reference gives SplitMix64's published first output for seed 0 (splitmix64.c:
    0xE220A8397B1DCDAF), so the comparisons below compare with the real generator."""
    assert splitmix64(0, 0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("key", [0, 1, 123456789, 2**63 + 12345, M64])
def test_words_equal_python_splitmix64(key):
    got = rng.words(torch.tensor([rng._signed(key)]), torch.tensor([5]), 300)[0].tolist()
    assert [v & M64 for v in got] == [splitmix64(key, 5 + i) for i in range(300)]


def test_values_equal_the_formulas_in_python():
    """Value j of a sample of m takes word j's high half, value n + j its low half (n = ceil(m / 2))."""
    key, m = 987654321, 11
    n = (m + 1) // 2
    normal = rng.draw(rng.Stream(key), (m,)).tolist()
    uniform = rng.draw(rng.Stream(key), (m,), "rand").tolist()
    for j in range(n):
        w = splitmix64(key, j)
        hi, lo = w >> 32, w & 0xFFFFFFFF
        assert uniform[j] == hi / 2**32
        u1, u2 = (hi + 0.5) / 2**32, (lo + 0.5) / 2**32
        r = math.sqrt(-2 * math.log(u1))
        assert normal[j] == pytest.approx(r * math.cos(2 * math.pi * u2), rel=1e-14, abs=1e-15)
        if n + j < m:
            assert uniform[n + j] == lo / 2**32
            assert normal[n + j] == pytest.approx(r * math.sin(2 * math.pi * u2), rel=1e-14, abs=1e-15)


def test_stream_position_advances_and_shared_streams_take_in_turn():
    s = rng.Stream(42)
    a = rng.draw(s, (2, 7))  # one stream for the whole batch: 14 values, 7 words
    assert s.position == 7
    rows = rng.draw([rng.Stream(42), rng.Stream(42)], (2, 7))
    assert torch.equal(rows[0], rows[1])  # two streams, same key: the same draws
    t = rng.Stream(42)
    shared = rng.draw([t, t], (2, 6))     # one stream shared by two samples: words 0-2, then 3-5
    assert t.position == 6
    assert torch.equal(shared[1], rng.draw(rng.Stream(42, position=3), (6,)))
    assert a.shape == (2, 7)


def test_a_sample_does_not_depend_on_its_batch():
    alone = rng.draw([rng.Stream(7)], (1, 3, 5, 5))
    batch = rng.draw([rng.Stream(3), rng.Stream(7), rng.Stream(9)], (3, 3, 5, 5))
    assert torch.equal(alone[0], batch[1])


def test_blocks_on_the_cpu_equal_one_piece(monkeypatch):
    streams = lambda: [rng.Stream(i * 77) for i in range(3)]
    one = rng.draw(streams(), (3, 3, 20, 21))
    monkeypatch.setattr(rng, "CPU_BLOCK", 7)  # blocks of 2 words per row: many blocks, a ragged last one
    assert torch.equal(rng.draw(streams(), (3, 3, 20, 21)), one)


def test_distributions():
    """200,000 draws: Kolmogorov-Smirnov against N(0, 1) and U[0, 1) (fixed key: deterministic), moments."""
    from scipy import stats

    z = rng.draw(rng.Stream(2024), (200_000,)).numpy()
    u = rng.draw(rng.Stream(2025), (200_000,), "rand").numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.var() - 1) < 4 * math.sqrt(2 / z.size)
    assert u.min() >= 0 and u.max() < 1
    # pairs from one word are independent: cos and sin halves uncorrelated
    n = z.size // 2
    assert abs(np.corrcoef(z[:n], z[n:])[0, 1]) < 4 / math.sqrt(n)


def test_common_noise_draws_streams_on_the_device_and_keeps_torch_generators():
    streams = [rng.Stream(1), rng.Stream(2)]
    assert torch.equal(_common.noise((2, 3, 4), streams), rng.draw([rng.Stream(1), rng.Stream(2)], (2, 3, 4)))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(_common.noise((2, 3), g), torch.randn(2, 3, generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.float64))
    with pytest.raises(ValueError):
        rng.draw([rng.Stream(1)], (2, 3))
    assert rng.draw([], (0, 3, 4)).shape == (0, 3, 4)            # an empty batch
    assert rng.draw([rng.Stream(1)], (1, 0)).shape == (1, 0)      # empty samples


_CHILD = """
import json, sys, torch
from transexplain import rng
z = rng.draw([rng.Stream(11), rng.Stream(12)], (2, 3, 40, 40))
u = rng.draw([rng.Stream(13)], (1, 5000), "rand")
print(json.dumps({"cap": torch.backends.cpu.get_cpu_capability(), "z": z.flatten().tolist(), "u": u.flatten().tolist()}))
"""


def test_the_same_draws_under_the_portable_cpu_kernels():
    """Integer words are exact; the float steps (log, sqrt, cos, sin) are within an ulp on every kernel."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["cap"].lower() == "default"
    z = rng.draw([rng.Stream(11), rng.Stream(12)], (2, 3, 40, 40)).flatten().numpy()
    u = rng.draw([rng.Stream(13)], (1, 5000), "rand").flatten().numpy()
    assert np.array_equal(np.asarray(child["u"]), u)
    assert np.abs(np.asarray(child["z"]) - z).max() <= 4 * np.finfo(np.float64).eps * np.abs(z).max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_draws_on_a_gpu():
    cpu = rng.draw([rng.Stream(5), rng.Stream(6)], (2, 3, 64, 64))
    gpu = rng.draw([rng.Stream(5), rng.Stream(6)], (2, 3, 64, 64), device="cuda").cpu()
    assert (gpu - cpu).abs().max() <= 4 * torch.finfo(torch.float64).eps * cpu.abs().max()
    u = rng.draw([rng.Stream(5)], (1, 999), "rand")
    assert torch.equal(rng.draw([rng.Stream(5)], (1, 999), "rand", device="cuda").cpu(), u)


def test_suite_noise_of_an_image_does_not_depend_on_its_batch():
    """ROAD's copies of one image share its Stream (drawn in turn), infidelity and max-sensitivity
    draw from their own: an image gives the same noisy inputs alone and inside a batch."""
    from transexplain.evaluation.metrics import curves, road, robustness
    from transexplain.evaluation.suite import per_image_streams

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    maps = curves.gaussian_blur(torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64), 5, 2.0)[:, 0]
    batch = per_image_streams(0, [4, 5, 6], "rollout")
    alone = per_image_streams(0, [5], "rollout")
    r_batch = road.road_inputs(x, maps, generator=batch("road_morf"))
    r_alone = road.road_inputs(x[1:2], maps[1:2], generator=alone("road_morf"))
    assert torch.equal(r_batch[1], r_alone[0])
    assert not torch.equal(r_batch[0], r_batch[1])
    i_batch = robustness.infidelity_perturbations(x, generator=batch("infidelity"))
    assert torch.equal(i_batch[1], robustness.infidelity_perturbations(x[1:2], generator=alone("infidelity"))[0])
    s_batch = robustness.sensitivity_perturbations(x, generator=batch("max_sensitivity"))
    assert torch.equal(s_batch[1], robustness.sensitivity_perturbations(x[1:2], generator=alone("max_sensitivity"))[0])
    # another metric of the same image draws other noise
    assert not torch.equal(i_batch[1], robustness.infidelity_perturbations(x[1:2], generator=alone("other"))[0])
