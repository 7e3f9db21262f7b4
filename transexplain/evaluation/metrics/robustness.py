"""Infidelity and max-sensitivity (Yeh, Hsieh, Suggala, Inouye and Ravikumar, NeurIPS 2019).

* **Infidelity** (Yeh et al., Def. 2.1): with random perturbations I of the input,
  ``INFD = E_I[(I · Φ - (f(x) - f(x - I)))^2]``, Φ the map broadcast over the colour channels (so
  ``I · Φ = sum_p Φ_p sum_c I_{c,p}``) and f the explained class's probability. Our maps are min-max
  normalised, so their scale is arbitrary; by default the map is rescaled by the least-squares
  ``β = E[(I·Φ) Δf] / E[(I·Φ)^2]`` first (Yeh et al., Sec. 2.3; Captum's ``normalize=True``),
  ``INFD = E[(β I·Φ - Δf)^2]``. Perturbations: ``I ~ N(0, σ^2)`` per input value (σ = 0.1 in the
  model's normalised input space), S = 10 samples; an expectation over S samples is their mean.
  Lower is better. Captum's ``captum.metrics.infidelity`` computes the same from a model; the tests
  check ours against it on the same perturbations.
* **Max-sensitivity** (Yeh et al., Def. 3.1): ``SENS_max = max_{||δ||_∞ <= r} ||Φ(x + δ) - Φ(x)|| /
  ||Φ(x)||``, estimated by S = 10 uniform samples of δ in the L∞ ball of radius r = 0.02 (Captum's
  ``sensitivity_max`` default), Frobenius norms; ||Φ(x)|| = 0 counts as 1 (Captum's convention).
  Lower is better. The explanations of the perturbed inputs are made by the runner; this function
  only compares maps.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import noise

#: infidelity's perturbation scale and sample count; max-sensitivity's radius and sample count
INFIDELITY_SIGMA, INFIDELITY_SAMPLES = 0.1, 10
SENSITIVITY_RADIUS, SENSITIVITY_SAMPLES = 0.02, 10


def infidelity_perturbations(x: torch.Tensor, samples: int = INFIDELITY_SAMPLES, sigma: float = INFIDELITY_SIGMA,
                             generator=None) -> torch.Tensor:
    """(B, C, H, W) -> (B, S, C, H, W) Gaussian perturbations I (float64 draws of `_common.noise`)."""
    b = x.shape[0]
    return (sigma * noise((b, samples, *x.shape[1:]), generator, device=x.device)).to(x)


def infidelity_inputs(x: torch.Tensor, perturbations: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, S, C, H, W) -> (B, S, C, H, W) the perturbed inputs ``x - I``."""
    return x.unsqueeze(1) - perturbations


def infidelity(maps, perturbations, f_clean, f_perturbed, normalize: bool = True) -> np.ndarray:
    """(B, H, W) maps, (B, S, C, H, W) I, (B,) f(x), (B, S) f(x - I) -> (B,) infidelity."""
    pert = torch.as_tensor(perturbations)  # I · Φ where I is (a GPU's copies need not come back)
    maps = torch.as_tensor(maps).to(device=pert.device, dtype=torch.float64)
    dot = (pert.to(torch.float64).sum(2) * maps.unsqueeze(1)).flatten(2).sum(-1).cpu().numpy()  # (B, S)
    diff = np.asarray(f_clean, dtype=np.float64)[:, None] - np.asarray(f_perturbed, dtype=np.float64)
    if normalize:
        den = (dot * dot).mean(1)
        beta = np.divide((dot * diff).mean(1), den, out=np.zeros_like(den), where=den != 0)
        dot = beta[:, None] * dot
    return ((dot - diff) ** 2).mean(1)


def sensitivity_perturbations(x: torch.Tensor, samples: int = SENSITIVITY_SAMPLES, radius: float = SENSITIVITY_RADIUS,
                              generator=None) -> torch.Tensor:
    """(B, C, H, W) -> (B, S, C, H, W) inputs ``x + δ``, δ uniform in [-r, r] per value."""
    b = x.shape[0]
    u = noise((b, samples, *x.shape[1:]), generator, kind="rand", device=x.device)
    return x.unsqueeze(1) + ((2 * u - 1) * radius).to(x)


def max_sensitivity(maps, perturbed_maps) -> np.ndarray:
    """(B, H, W) maps of x, (B, S, H, W) maps of x + δ -> (B,) ``max_s ||Φ_s - Φ|| / ||Φ||``."""
    a = torch.as_tensor(maps).to(torch.float64).cpu()
    p = torch.as_tensor(perturbed_maps).to(torch.float64).cpu()
    norm = a.flatten(1).norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return ((p - a.unsqueeze(1)).flatten(2).norm(dim=2) / norm.unsqueeze(1)).max(1).values.numpy()
