"""Load a model by timm name, from a local checkpoint, or one of the embedded models.

A checkpoint is a `.safetensors` file (or a directory holding `model.safetensors`) with a
`config.json` beside it that carries what timm's pretrained_cfg carries:
`{"architecture": timm name, "model_kwargs": {...}, "num_classes": int, "input_size": [3, H, W],
"mean": [...], "std": [...], "class_names": [...]}`, optionally with `"conv_stem": [channels...]`
for a ViT whose patch embedding is a convolutional stem (see `add_conv_stem`). The architecture
`"torchvision:VisionTransformer"` names torchvision's ViT class instead, built from `model_kwargs`
(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim) and seen through timm's layout
like `torchvision:NAME` (a ViT of any size, e.g. a tiny random one, as a local folder).
A `.pth`/`.pt` file holding a state dict is also accepted for a timm name given with `--arch`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: embedded models shipped with the package: name -> checkpoint directory
EMBEDDED = {"embedded": ASSETS / "embedded_vit", "embedded-swin": ASSETS / "embedded_swin"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    mean: tuple
    std: tuple
    input_size: tuple
    class_names: list = field(default_factory=list)
    source: str = ""
    weights_hash: str = ""
    #: which weights: "pretrained:<timm tag>", "random-init", "checkpoint:<file>" or "embedded:<name>"
    weights: str = ""


def _hash_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def add_conv_stem(model: torch.nn.Module, channels) -> torch.nn.Module:
    """Replace a timm ViT's patch-embedding convolution by a convolutional stem ("early
    convolutions", Xiao et al. 2021): 3x3 stride-2 convolutions with BatchNorm and ReLU, one per
    entry of `channels`, then a 1x1 convolution to the embedding width. The stem's total stride
    must equal the patch size, so the token grid is unchanged."""
    import torch.nn as nn

    pe = model.patch_embed
    patch = pe.patch_size[0]
    if 2 ** len(channels) != patch or pe.patch_size[0] != pe.patch_size[1]:
        raise UserError(f"A conv stem of {len(channels)} stride-2 layers does not fit patch size {tuple(pe.patch_size)}: use log2(patch) layers.")
    layers, c_in = [], pe.proj.in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    layers.append(nn.Conv2d(c_in, pe.proj.out_channels, 1))
    pe.proj = nn.Sequential(*layers)
    return model


def build_timm(cfg: dict) -> torch.nn.Module:
    """The model a checkpoint's config.json describes (timm architecture, kwargs, optional conv stem;
    or torchvision's VisionTransformer)."""
    import timm

    if str(cfg["architecture"]).startswith("torchvision:"):
        if cfg["architecture"] != "torchvision:VisionTransformer":
            raise UserError(f"Unknown checkpoint architecture {cfg['architecture']!r}: of torchvision's models only "
                            f"'torchvision:VisionTransformer' is supported.")
        from torchvision.models.vision_transformer import VisionTransformer

        try:
            return VisionTransformer(num_classes=cfg.get("num_classes", 1000), **cfg.get("model_kwargs", {}))
        except TypeError as err:
            raise UserError(f"torchvision's VisionTransformer does not take the model_kwargs of this checkpoint ({err}).") from None

    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg.get("num_classes", 1000),
                              **cfg.get("model_kwargs", {}))
    if cfg.get("conv_stem"):
        add_conv_stem(model, cfg["conv_stem"])
    return model


def _random_init(build):
    """`build()` under a fixed seed, so that "random-init" names the same weights on every run
    (a resumed run continues with the weights it started with)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def load_checkpoint(path: Path, random_weights: bool = False) -> LoadedModel:
    """A checkpoint's model; with `random_weights` its architecture with seeded random weights."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_path = weights.parent / "config.json"
    if not weights.exists():
        raise UserError(f"No checkpoint at {weights}: give a .safetensors file or a directory holding model.safetensors.")
    if not config_path.exists():
        raise UserError(f"The checkpoint {weights} has no config.json beside it: write one naming its timm architecture.")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path} is not valid JSON ({err.msg} at line {err.lineno}): fix or regenerate it.") from None
    if "architecture" not in cfg:
        raise UserError(f"{config_path} does not name an 'architecture': add the timm model name it was built with.")
    try:
        model = _random_init(lambda: build_timm(cfg)) if random_weights else build_timm(cfg)
    except RuntimeError as err:
        raise UserError(f"timm cannot build {cfg['architecture']!r} from {config_path}: {err}.") from None
    if random_weights:
        return _finish_checkpoint(model, cfg, weights, "random-init", "random-init")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"Cannot read the weights in {weights} ({err}): the file is damaged or not safetensors.") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"The weights in {weights} do not fit {cfg['architecture']} ({len(missing)} missing, {len(unexpected)} unexpected keys): check config.json."
        )
    return _finish_checkpoint(model, cfg, weights, _hash_file(weights), f"checkpoint:{weights}")


def _finish_checkpoint(model, cfg: dict, weights: Path, weights_hash: str, label: str) -> LoadedModel:
    model.eval()
    if str(cfg["architecture"]).startswith("torchvision:"):
        model = _canonical(model, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3), str(weights))
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": tuple(cfg.get("mean", (0.5,) * 3)),
                            "std": tuple(cfg.get("std", (0.5,) * 3)), "input_size": input_size}
    return LoadedModel(model=model, name=cfg["architecture"], mean=tuple(cfg.get("mean", (0.5,) * 3)),
                       std=tuple(cfg.get("std", (0.5,) * 3)), input_size=input_size,
                       class_names=list(cfg.get("class_names", [])), source=str(weights),
                       weights_hash=weights_hash, weights=label)


def cached_weights(spec: str):
    """(tag, cached file or None, where it would be) of a timm name's pretrained weights.

    Looks only in the local caches timm reads: the Hugging Face hub cache (`$HF_HUB_CACHE`, by
    default ~/.cache/huggingface/hub) for weights on the hub, torch's hub cache
    (`$TORCH_HOME/hub/checkpoints`) for weights given by URL. Never touches the network.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec)
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for {spec!r}: give a checkpoint, or pass --random-weights.")
    tag = cfg.tag or "default"
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return tag, Path(found), f"hub {repo}"
        where = f"hub {repo} in {constants.HF_HUB_CACHE}"
    else:
        where = "nowhere"
    if cfg.url:
        from urllib.parse import urlparse

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return tag, cached, "url"
        where = f"{where} or {cached}" if cfg.hf_hub_id else str(cached)
    return tag, None, where


def load_model(spec: str | None = "embedded", num_classes: int | None = None, pretrained: bool | None = None,
               random_weights: bool = False, classes=None, prompt: str = "a photo of a {}") -> LoadedModel:
    """`spec`: 'embedded' (default), 'embedded-swin', a timm model name (also as `timm:NAME`), a
    checkpoint path, `hf:NAME_OR_FOLDER` (a Hugging Face image classifier), `torchvision:NAME`, or
    `clip:NAME_OR_FOLDER` (a Hugging Face CLIPModel as a zero-shot classifier over `classes`, each
    written into `prompt`), or `open_clip:ARCH:WEIGHTS_FILE` / `open_clip:FOLDER` (an open_clip model
    the same way; models/open_clip.py).

    A timm name loads its pretrained weights from the local cache (never from the network; a
    missing cache entry is a one-line UserError saying how to provide them). `random_weights`
    gives the same architecture with seeded random weights instead (`weights` = "random-init").
    `pretrained=False` is the old spelling of `random_weights=True`.
    """
    import timm

    random_weights = bool(random_weights or pretrained is False)
    spec = spec or "embedded"
    family, sep, rest = spec.partition(":")
    if sep and family in ("hf", "torchvision") and rest:
        return (load_hf_vision if family == "hf" else load_torchvision)(rest, random_weights=random_weights)
    if sep and family == "clip" and rest:
        return load_clip(rest, classes, prompt, random_weights=random_weights)
    if sep and family == "open_clip" and rest:
        from .open_clip import load_open_clip

        return load_open_clip(rest, classes, prompt, random_weights=random_weights)
    if classes:
        raise UserError("--classes applies to CLIP models only (--model clip:PATH or open_clip:...): drop it, or give a CLIP model.")
    if sep and family == "timm" and rest:
        spec = rest
    if spec in EMBEDDED:
        path = EMBEDDED[spec]
        if not (path / "model.safetensors").exists():
            raise UserError(f"The embedded model {spec!r} is not built yet: run `python scripts/train_embedded_{'swin' if 'swin' in spec else 'vit'}.py`.")
        loaded = load_checkpoint(path, random_weights=random_weights)
        if not random_weights:
            loaded.weights = f"embedded:{spec}"
        return loaded
    p = Path(spec)
    if p.suffix in (".safetensors",) or p.is_dir():
        return load_checkpoint(p, random_weights=random_weights)
    if p.suffix in (".pth", ".pt", ".bin"):
        raise UserError(f"{spec} is a raw PyTorch file: save it as model.safetensors with a config.json naming its timm architecture.")
    if not timm.is_model(spec):
        raise UserError(f"Unknown model {spec!r}: give 'embedded', a timm model name (e.g. vit_base_patch16_224) or a checkpoint path.")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if random_weights:
        model = _random_init(lambda: timm.create_model(spec, pretrained=False, **kwargs))
        weights_hash = label = "random-init"
    else:
        tag, cached, where = cached_weights(spec)
        if cached is None:
            raise UserError(
                f"The pretrained weights of {spec} are not in the local cache (looked for {where}): download them once "
                f"with network access (python -c \"import timm; timm.create_model('{spec}', pretrained=True)\"), "
                f"or give a checkpoint (.safetensors with config.json), or pass --random-weights."
            )
        # load the cached file directly: timm reads it like a checkpoint and adapts the classifier
        overlay = {"file": str(cached)}
        if where != "url":
            overlay["custom_load"] = False  # hub files are plain state dicts
        try:
            model = timm.create_model(spec, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as err:
            raise UserError(f"Cannot read the cached weights {cached} of {spec} ({type(err).__name__}: {err}): "
                            f"delete the file and download it again.") from None
        weights_hash, label = _hash_file(cached), f"pretrained:{tag}"
    model.eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return LoadedModel(model=model, name=spec, mean=tuple(cfg.get("mean", (0.5,) * 3)), std=tuple(cfg.get("std", (0.5,) * 3)),
                       input_size=tuple(cfg.get("input_size", (3, 224, 224))), source=f"timm:{spec}",
                       weights_hash=weights_hash, weights=label)


def _canonical(model: torch.nn.Module, mean, std, what: str) -> torch.nn.Module:
    """The timm-layout view of a Hugging Face / torchvision ViT (models/canonizers.py)."""
    from .canonizers import canonize

    view = canonize(model.eval())
    if view is None:
        raise UserError(f"{what} is a {type(model).__name__}: supported here are Hugging Face ViT, DeiT, Swin and BEiT "
                        f"image classifiers and torchvision's VisionTransformer.")
    view.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std)}
    return view


def load_hf_vision(name: str, random_weights: bool = False) -> LoadedModel:
    """A Hugging Face image classifier from a local folder or the local hub cache (never the network);
    mean and std from its preprocessor_config.json."""
    import transformers

    what = f"hf:{name}"
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"No Hugging Face model {name!r} in a local folder or the local hub cache: give a folder with "
                        f"config.json, or download it once with network access (transformers' from_pretrained).") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForImageClassification
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(name, local_files_only=True)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no preprocessor_config.json: the ViT processor's defaults
    if random_weights:
        model = _random_init(lambda: cls._from_config(config))
        weights_hash = label = "random-init"
    else:
        try:
            model = cls.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load the weights of {what} ({err}): give a folder with the weights, or pass --random-weights.") from None
        weights_hash, label = "", f"pretrained:{name}"
        folder = Path(name)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        if files:
            weights_hash = _hash_file(files[0])
    view = _canonical(model.float(), mean, std, what)
    size = view.patch_embed.img_size
    names = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else []
    return LoadedModel(model=view, name=what, mean=mean, std=std, input_size=(view.patch_embed.proj.in_channels, *size),
                       class_names=names, source=what, weights_hash=weights_hash, weights=label)


def load_torchvision(name: str, random_weights: bool = False) -> LoadedModel:
    """A torchvision ViT (`vit_b_16`, ...): its DEFAULT weights from torch's hub cache, never the network."""
    import torchvision

    what = f"torchvision:{name}"
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no model {name!r}: give one of {', '.join(n for n in torchvision.models.list_models() if n.startswith('vit'))}.") from None
    tf = weights.transforms()
    mean, std = tuple(tf.mean), tuple(tf.std)
    names = list(weights.meta.get("categories", []))
    if random_weights:
        model = _random_init(lambda: torchvision.models.get_model(name, weights=None))
        weights_hash = label = "random-init"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            raise UserError(f"The weights of {what} are not in the local cache (looked for {cached}): download them once "
                            f"with network access (torchvision.models.get_model('{name}', weights='DEFAULT')), or pass --random-weights.")
        model = torchvision.models.get_model(name, weights=None)
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        weights_hash, label = _hash_file(cached), f"pretrained:{weights}"
    view = _canonical(model, mean, std, what)
    return LoadedModel(model=view, name=what, mean=mean, std=std, input_size=(3, *view.patch_embed.img_size),
                       class_names=names, source=what, weights_hash=weights_hash, weights=label)


def load_clip(name: str, classes, prompt: str = "a photo of a {}", random_weights: bool = False) -> LoadedModel:
    """A Hugging Face CLIPModel (local folder or hub cache) as a zero-shot classifier over `classes`."""
    import transformers

    from .canonizers import zero_shot_classifier

    what = f"clip:{name}"
    if isinstance(classes, str):
        classes = classes.split(",")
    if not classes:
        raise UserError(f"{what} is a zero-shot model: name its classes with --classes a,b,... (and optionally --prompt).")
    try:
        config = transformers.CLIPConfig.from_pretrained(name, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"No CLIP model with a tokenizer at {name!r} (a local folder or the local hub cache): give a folder "
                        f"holding config.json and the tokenizer files.") from None
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(name, local_files_only=True)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no preprocessor_config.json: CLIP's own normalisation
    if random_weights:
        model = _random_init(lambda: transformers.CLIPModel._from_config(config))
        weights_hash = label = "random-init"
    else:
        model = transformers.CLIPModel.from_pretrained(name, local_files_only=True)
        weights_hash, label = "", f"pretrained:{name}"
        files = sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() else []
        if files:
            weights_hash = _hash_file(files[0])
    view = zero_shot_classifier(model.float().eval(), tokenizer, classes, prompt)
    view.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std)}
    return LoadedModel(model=view, name=what, mean=mean, std=std, input_size=(3, *view.patch_embed.img_size),
                       class_names=list(view.class_names), source=f"{what} prompt={prompt!r}",
                       weights_hash=weights_hash, weights=label)
