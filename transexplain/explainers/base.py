"""The explainer plugin interface, the method registry and the shared post-processing."""
from __future__ import annotations

import numbers

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError

_REGISTRY: dict[str, type] = {}
_ALIASES: dict[str, str] = {}


def register(cls):
    """Class decorator: a method is found by its `name` (and its `aliases`)."""
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> type:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UserError(
            f"Unknown method {name!r}: choose one of {', '.join(_REGISTRY)} (see `tx-bench methods`)."
        )
    return _REGISTRY[key]


def refusal(method: str, adapter) -> str | None:
    """Why `method` cannot run on `adapter`'s architecture (one sentence), or None when it can.

    Decided only by comparing what the method needs with what the adapter offers."""
    from ..models.base import CAPABILITIES, missing_capabilities

    cls = get_method(method)
    missing = missing_capabilities(cls.needs, adapter.offers)
    if not missing:
        return None
    what = "; ".join(CAPABILITIES[m] for m in missing)
    arch = getattr(adapter, "description", None) or f"{adapter.family} models"
    return f"Method {cls.name!r} is not defined on {arch}: it needs {what}, which the {adapter.family} adapter does not offer there."


def support_matrix() -> dict:
    """{method: {family: None (supported) or the refusal sentence}} for every registered method and
    every adapter family, computed from `needs` and `offers` alone."""
    from ..models.registry import adapter_classes

    return {name: {family: refusal(name, cls) for family, cls in adapter_classes().items()} for name in _REGISTRY}


def list_methods() -> dict[str, str]:
    """Every method's name with its one-line description."""
    return {name: cls.description for name, cls in _REGISTRY.items()}


@dataclass
class Explanation:
    """What an explainer returns for a batch.

    token_map: (B, grid_h, grid_w) raw scores before upsampling or normalisation (for pixel-level
    methods such as full_lrp, the (B, H, W) pixel map itself); heatmap: (B, H, W) upsampled to the
    input size and min-max normalised per sample; target: (B,) the class explained.
    """

    token_map: torch.Tensor
    heatmap: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    method: str
    extras: dict = field(default_factory=dict)

    @property
    def empty(self) -> torch.Tensor:
        """(B,) True where the explanation is constant (e.g. every α=1 contribution was <= 0)."""
        flat = self.token_map.reshape(self.token_map.shape[0], -1)
        return flat.amax(1) == flat.amin(1)


def normalise_per_sample(maps: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per sample; a constant map becomes all zeros (never NaN)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return out.reshape(maps.shape)


def upsample(token_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(token_map.shape[-2:]) == tuple(size):
        return token_map
    return F.interpolate(token_map.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def _check_option_type(method: str, key: str, default, value):
    """An option whose default is a flag, a whole number or a number takes only that kind of value (so a
    wrong `--option` value is refused when the method is set up, before any work)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, numbers.Integral) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, kind = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        raise UserError(f"Method {method!r}: option {key} must be {kind}, got {value!r}.")


class Explainer:
    """One method. Subclasses set the class attributes and implement `scores`."""

    name: str = ""
    aliases: tuple = ()
    description: str = ""
    class_specific: bool = False
    pixel_level: bool = False
    #: the adapter capabilities this method cannot work without (keys of models.base.CAPABILITIES)
    needs: frozenset = frozenset()

    def __init__(self, **options):
        unknown = set(options) - set(self.defaults())
        if unknown:
            raise UserError(
                f"Method {self.name!r} has no option {', '.join(sorted(unknown))}: "
                f"its options are {', '.join(self.defaults()) or 'none'}."
            )
        for key, value in options.items():
            _check_option_type(self.name, key, self.defaults()[key], value)
        self.options = {**self.defaults(), **options}

    @classmethod
    def defaults(cls) -> dict:
        return {}

    def scores(self, adapter, x: torch.Tensor, target: torch.Tensor | None):
        """Return (scores, logits, target): scores are a row over tokens or a pixel map."""
        raise NotImplementedError


def select_target(logits: torch.Tensor, target) -> torch.Tensor:
    """The predicted class when `target` is None, else `target` checked against the class count."""
    n_classes = logits.shape[-1]
    if target is None:
        return logits.argmax(-1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1 and logits.shape[0] > 1:
        t = t.expand(logits.shape[0])
    if t.numel() != logits.shape[0]:
        raise UserError(f"Got {t.numel()} targets for {logits.shape[0]} images: give one target, or one per image.")
    if (t < 0).any() or (t >= n_classes).any():
        raise UserError(f"Target class {t.tolist()} is out of range: the model has {n_classes} classes (0..{n_classes - 1}).")
    return t


def content_seed(sample: torch.Tensor, seed: int) -> int:
    """A generator seed drawn from one sample's content and the user's seed, so that a seeded
    random draw (the random baseline, SmoothGrad's noise) is the same for the same input whatever
    the batch. Images are hashed in float32, so float32 and float64 runs draw alike; token ids as
    integers."""
    import hashlib

    data = sample.detach().cpu()
    data = data.float() if data.is_floating_point() else data.long()
    digest = hashlib.sha256(data.numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") ^ int(seed)


def target_gradients(logits: torch.Tensor, target: torch.Tensor, tensors: list) -> list:
    """∂y_t/∂T for each T: the raw (pre-softmax) logit of the explained class, summed over the batch."""
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return list(torch.autograd.grad((logits * one_hot).sum(), tensors))
