"""What a benchmark number was computed with: package versions, the processor, the precision.

The same code gives other numbers under another torch, another CPU kernel set or another precision
(docs/numerics.md), so every results file keeps this record beside its configuration and
`tx-bench report` prints it under the table. `collect_environment` is the one place that gathers it;
the perturbation, segmentation and ERASER runs all get it through `ResultStore`.
"""
from __future__ import annotations

import platform

#: the distributions whose versions decide the numbers, in the order the report prints them
PACKAGES = ("torch", "timm", "transformers", "numpy", "h5py")


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def processor(device: str | None = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU kernel set PyTorch dispatches to (e.g. 'AVX512')."""
    import torch

    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU {torch.backends.cpu.get_cpu_capability()}"


def collect_environment(precision: str | None = None, device: str | None = "cpu") -> dict:
    """A JSON-ready record of the software and hardware a run computes with.

    precision: the precision the explanations and forwards ran in (None when the run does not say).
    device: 'cpu' or a CUDA device; decides whether the CPU kernel set or the GPU is named.
    """
    from .. import __version__

    env = {"python": platform.python_version(), "transexplain": __version__}
    env.update({name: _version(name) for name in PACKAGES})
    env["processor"] = processor(device)
    env["precision"] = precision
    return env


def describe(env: dict) -> str:
    """One line: 'precision float64; CPU AVX512; python 3.11.7, torch 2.14.1, ...'."""
    versions = ", ".join(f"{name} {env.get(name) or 'n/a'}" for name in ("python",) + PACKAGES)
    return f"precision {env.get('precision') or 'not recorded'}; {env.get('processor', 'processor not recorded')}; {versions}"


def environment_lines(environments: list) -> list:
    """The lines a report prints under its table (one per distinct environment the run saw)."""
    if not environments:
        return ["Environment: not recorded (a file written before transexplain recorded it)."]
    if len(environments) == 1:
        return [f"Environment: {describe(environments[0])}"]
    lines = [f"Environment: this run was computed (and resumed) in {len(environments)} environments:"]
    return lines + [f"  {i}. {describe(env)}" for i, env in enumerate(environments, start=1)]
