"""Cumulative perturbation curves: insertion / deletion, MIF / LIF / SRG, AOPC / ABPC.

Every function here is pure: images and maps in, perturbed copies out (`*_inputs`), or the
target-class probabilities of those copies in, numbers out. The forwards belong to the runner
(`transexplain.evaluation.suite`). A curve has ``steps + 1`` points, point k having
``floor(H*W*k/steps)`` pixels changed (k = 0: the clean image; k = steps: every pixel), pixels
taken in removal order (`_common.removal_rank`: a stable sort, equal values by increasing flat
index). Probabilities are softmax probabilities of the explained class (the predicted class).

Sources and protocols
---------------------
* **Deletion / insertion** (Petsiuk, Das and Saenko, BMVC 2018, "RISE", Sec. 4.1). Deletion: the
  pixels, most relevant first, are set to a baseline (``fill``; ours: black, 0 in [0, 1] space, as the
  paper's perturbation test); insertion: the pixels, most relevant first, are copied into a blurred
  copy of the image. Score: the normalised area under the probability curve,
  ``AUC = (1/S) * sum_{k=1}^{S} (p_{k-1} + p_k) / 2`` with S = steps (the trapezoid on x = k/S).
  Deletion: lower is better; insertion: higher is better. RISE blurs with an 11 x 11 kernel of
  sigma 5 built by filtering a delta with SciPy (reflected borders); ours is the sampled, normalised
  Gaussian of the same size and sigma, zero-padded, on the normalised input (`gaussian_blur`).
  RISE changes 224 pixels per step (224 steps at 224 x 224); ours: ``steps`` (default 16) equal steps.
* **MIF / LIF / SRG** (Blücher, Vielhaben and Strodthoff, TMLR 2024, "Decoupling pixel flipping and
  occlusion strategy for consistent XAI benchmarks"). MIF: most-influential-first deletion, LIF:
  least-influential-first deletion, both as the normalised AUC above with the same occluder;
  ``SRG = AUC_LIF - AUC_MIF`` (higher is better). The occluder is a protocol option; ours defaults to
  the image's per-channel mean (so that MIF is not the deletion curve with another name).
* **AOPC** (Samek et al., IEEE TNNLS 2017): ``AOPC = 1/(S+1) * sum_{k=0}^{S} (p_0 - p_k)`` on the MoRF
  (most relevant first) curve; higher is better. **ABPC** (Schulz et al., ICLR 2020, "IBA"): the area
  between the LeRF and MoRF curves, ``ABPC = 1/(S+1) * sum_{k=0}^{S} (p^LeRF_k - p^MoRF_k)``; higher is
  better. Both reuse the MIF / LIF curves (same occluder, same steps): no extra forward.
* A constant map ranks nothing: every value is NaN for it (`_common.degenerate`).
"""
from __future__ import annotations


import numpy as np
import torch

from ._common import degenerate, first_k_masks, step_counts, with_fill, with_nan

#: default number of steps of a curve (steps + 1 points)
STEPS = 16


def curve_masks(maps: torch.Tensor, steps: int = STEPS, most_first: bool = True) -> torch.Tensor:
    """(B, H, W) -> (B, steps + 1, H, W) bool: the pixels changed at each point of the curve."""
    h, w = maps.shape[-2:]
    return first_k_masks(maps, step_counts(h * w, steps), most_first)


def gaussian_kernel(size: int = 11, sigma: float = 5.0, dtype=torch.float64) -> torch.Tensor:
    """(size,) normalised samples of ``exp(-t^2 / (2 sigma^2))`` at t = -(size//2)..size//2."""
    t = torch.arange(size, dtype=dtype) - size // 2
    k = torch.exp(-t * t / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """(B, C, H, W) -> the same, blurred per channel with a separable Gaussian, zero padding."""
    c = x.shape[1]
    k = gaussian_kernel(size, sigma, dtype=x.dtype).to(x.device)
    pad = size // 2
    y = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, size), padding=(0, pad), groups=c)
    return torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, size, 1), padding=(pad, 0), groups=c)


def deletion_inputs(x: torch.Tensor, maps: torch.Tensor, fill, steps: int = STEPS,
                    most_first: bool = True) -> torch.Tensor:
    """(B, C, H, W), (B, H, W) -> (B, steps + 1, C, H, W): point k has its first pixels set to ``fill``
    (a (C, 1, 1) tensor, or (B, C, 1, 1) per image)."""
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    fill = fill.unsqueeze(1) if fill.dim() == 4 else fill
    return with_fill(x, curve_masks(maps, steps, most_first), fill)


def insertion_inputs(x: torch.Tensor, maps: torch.Tensor, blurred: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """(B, C, H, W), (B, H, W), blurred (B, C, H, W) -> (B, steps + 1, C, H, W): point k is the blurred
    image with its first pixels (most relevant first) taken from the original."""
    masks = curve_masks(maps, steps, True)
    return torch.where(masks.unsqueeze(2), x.unsqueeze(1), blurred.unsqueeze(1))


def mean_fill(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1): each image's per-channel mean (the default occluder of MIF / LIF and SaCo)."""
    return x.mean(dim=(2, 3), keepdim=True)


def curve_auc(probs) -> np.ndarray:
    """(B, K) curves on x = 0, 1/(K-1), ..., 1 -> (B,) trapezoid areas,
    ``(1/(K-1)) * (sum_k p_k - (p_0 + p_{K-1}) / 2)``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] < 2:
        raise ValueError("a curve needs at least two points")
    return (p.sum(-1) - (p[..., 0] + p[..., -1]) / 2.0) / (p.shape[-1] - 1)


def deletion(probs, maps) -> np.ndarray:
    """Deletion AUC per image (lower is better); NaN for a constant map."""
    return with_nan(curve_auc(probs), degenerate(maps))


def insertion(probs, maps) -> np.ndarray:
    """Insertion AUC per image (higher is better); NaN for a constant map."""
    return with_nan(curve_auc(probs), degenerate(maps))


def mif(probs, maps) -> np.ndarray:
    """Most-influential-first deletion AUC per image (lower is better); NaN for a constant map."""
    return with_nan(curve_auc(probs), degenerate(maps))


def lif(probs, maps) -> np.ndarray:
    """Least-influential-first deletion AUC per image (higher is better); NaN for a constant map."""
    return with_nan(curve_auc(probs), degenerate(maps))


def srg(mif_probs, lif_probs, maps) -> np.ndarray:
    """Symmetric relevance gain per image, ``AUC(LIF) - AUC(MIF)`` (higher is better)."""
    return with_nan(curve_auc(lif_probs) - curve_auc(mif_probs), degenerate(maps))


def aopc(morf_probs, maps) -> np.ndarray:
    """AOPC per image, ``mean_{k=0..S} (p_0 - p_k)`` on the MoRF curve (higher is better)."""
    p = np.asarray(morf_probs, dtype=np.float64)
    return with_nan((p[:, :1] - p).mean(-1), degenerate(maps))


def abpc(lerf_probs, morf_probs, maps) -> np.ndarray:
    """ABPC per image, ``mean_{k=0..S} (p^LeRF_k - p^MoRF_k)`` (higher is better)."""
    d = np.asarray(lerf_probs, dtype=np.float64) - np.asarray(morf_probs, dtype=np.float64)
    return with_nan(d.mean(-1), degenerate(maps))


def forwards(steps: int = STEPS) -> int:
    """Forwards one curve costs per image and method."""
    return steps + 1


__all__ = ["STEPS", "curve_masks", "gaussian_kernel", "gaussian_blur", "deletion_inputs", "insertion_inputs",
           "mean_fill", "curve_auc", "deletion", "insertion", "mif", "lif", "srg", "aopc", "abpc", "forwards"]
