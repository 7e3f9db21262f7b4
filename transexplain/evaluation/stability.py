"""Do the maps depend on the machine? The same explanations computed under other CPU kernels.

PyTorch picks its CPU kernels from `ATEN_CPU_CAPABILITY` (`default`, `avx2`, `avx512`) when the
process starts, so each capability needs a process of its own: `kernel_maps` runs
`python -m transexplain.evaluation.stability` in a subprocess with the capability set and reads
the heatmaps back. Used by tests/test_cross_kernel.py and scripts/measure_cross_kernel.py.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

#: the capabilities PyTorch knows on x86; "native" means: leave the variable unset
CAPABILITIES = ("default", "avx2", "avx512")


def embedded_batch(model_spec: str, n: int):
    """(loaded model, first `n` embedded validation images) for `model_spec`."""
    import torch

    from ..data.imagenet import ImageFolderDataset, Preprocess
    from ..data.shapes import embedded_paths
    from ..models.loading import load_model

    loaded = load_model(model_spec)
    ds = ImageFolderDataset(embedded_paths()["val"], Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std))
    return loaded, torch.stack([ds.load(i) for i in range(min(n, len(ds)))])


def compute_maps(model_spec: str, n: int, methods, precision: str, noise: float = 0.0, batch_size: int = 25,
                 options: dict | None = None) -> dict:
    """{method: (n, H, W) float64 heatmaps} of the first `n` embedded validation images.

    noise: relative Gaussian noise added to the images (seeded), to measure how ill-conditioned a
    method itself is. The predicted class of the clean image is explained either way.
    """
    import torch

    import transexplain

    loaded, clean = embedded_batch(model_spec, n)
    x = clean
    if noise:
        gen = torch.Generator().manual_seed(1234)
        x64 = clean.double()
        x = x64 * (1 + noise * torch.randn(x64.shape, generator=gen, dtype=torch.float64))
    targets = torch.cat([transexplain.explain(loaded.model, clean[i:i + batch_size], "raw_attention", precision="float64").target
                         for i in range(0, len(clean), batch_size)])
    out = {}
    for method in methods:
        parts = []
        for i in range(0, len(x), batch_size):
            parts.append(transexplain.explain(loaded.model, x[i:i + batch_size], method, target=targets[i:i + batch_size],
                                              precision=precision, **(options or {}).get(method, {}))
                         .heatmap.double().cpu().numpy())
        out[method] = np.concatenate(parts)
    return out


def kernel_maps(model_spec: str, n: int, methods, precision: str, capability: str | None, timeout: float = 600,
                noise: float = 0.0, epsilon: str | None = None) -> dict:
    """`compute_maps` in a fresh process whose kernels are `capability` (None: the machine's own);
    `epsilon` sets that option of every (LRP-based) method named."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "maps.npz")
        cmd = [sys.executable, "-m", "transexplain.evaluation.stability", path, model_spec, str(n), ",".join(methods),
               precision, str(noise), epsilon or ""]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"maps under ATEN_CPU_CAPABILITY={capability}: {done.stderr[-2000:]}")
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


def capability_in_use() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability()).lower()


def _child(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("model")
    ap.add_argument("n", type=int)
    ap.add_argument("methods")
    ap.add_argument("precision")
    ap.add_argument("noise", type=float)
    ap.add_argument("epsilon", nargs="?", default="")
    a = ap.parse_args(argv)
    methods = a.methods.split(",")
    options = {m: {"epsilon": a.epsilon} for m in methods} if a.epsilon else None
    maps = compute_maps(a.model, a.n, methods, a.precision, noise=a.noise, options=options)
    np.savez(a.out, **maps, _capability=np.array(capability_in_use()))


if __name__ == "__main__":
    _child(sys.argv[1:])
