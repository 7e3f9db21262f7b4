"""The maps must not depend on the CPU: the same explanations under PyTorch's portable kernels
(ATEN_CPU_CAPABILITY=default), under AVX2 and under this machine's own kernels, in the default
precision, for every registered method. (Before float64 became the default, full_lrp differed by up
to 1.0 and transformer_attribution by 0.4 between AVX-512 and portable kernels.)"""
import numpy as np
import pytest

import transexplain
from transexplain.evaluation.stability import capability_in_use, compute_maps, kernel_maps
from transexplain.precision import DEFAULT_PRECISION

#: the goal of the "same numbers on every machine" issue, on [0, 1] heatmaps
TOLERANCE = 1e-3
N_IMAGES = {"embedded": 20, "embedded-swin": 6}


@pytest.fixture(scope="module", params=list(N_IMAGES))
def native(request):
    from transexplain.commands.common import resolve_methods
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model

    spec = request.param
    methods = resolve_methods("all", as_adapter(load_model(spec).model))  # every method this model can run
    return spec, methods, compute_maps(spec, N_IMAGES[spec], methods, DEFAULT_PRECISION)


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_method_agrees_across_cpu_kernels(native, capability):
    spec, methods, here = native
    other = kernel_maps(spec, N_IMAGES[spec], methods, DEFAULT_PRECISION, capability)
    used = str(other.pop("_capability"))
    assert used == capability or capability != "default", f"the child ran with {used}"
    diffs = {m: float(np.abs(other[m] - here[m]).max()) for m in methods}
    worst = {m: d for m, d in diffs.items() if d > TOLERANCE}
    assert not worst, f"{spec}: maps under {used} vs {capability_in_use()} differ by {worst}"


def test_child_process_really_switches_kernels():
    """The subprocess runs with the capability asked for (else the test above proves nothing)."""
    maps = kernel_maps("embedded", 1, ["raw_attention"], "float64", "default")
    assert str(maps["_capability"]) == "default"


@pytest.mark.slow
def test_batch_size_does_not_change_the_maps():
    """Issue: full_lrp's perturbation AUC was 67.2 at batch 1 and 67.0 at batch 50 (float32 kernels
    block a GEMM differently by its size). In the default precision every map is the same."""
    methods = list(transexplain.list_methods())
    one = compute_maps("embedded", 8, methods, DEFAULT_PRECISION, batch_size=1)
    eight = compute_maps("embedded", 8, methods, DEFAULT_PRECISION, batch_size=8)
    diffs = {m: float(np.abs(one[m] - eight[m]).max()) for m in methods}
    assert max(diffs.values()) <= TOLERANCE, diffs
