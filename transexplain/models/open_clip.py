"""open_clip (OpenCLIP) models as zero-shot classifiers, seen through timm's ViT layout.

open_clip's own `VisionTransformer` computes what timm's ViT computes with a class token and
pre-norm blocks: `conv1` (the patch embedding, no bias), `class_embedding` and
`positional_embedding` (added to every token), `ln_pre` (timm's `norm_pre`), `transformer.resblocks`
(each `ln_1`, an `nn.MultiheadAttention` with one packed `in_proj_weight` and `out_proj`, optional
layer scale `ls_1`/`ls_2`, `ln_2`, `mlp.c_fc` / `mlp.gelu` / `mlp.c_proj`), `ln_post` and the
projection matrix `proj`. `open_clip_vit` puts those modules, shared, into a meta-device timm
skeleton exactly as `canonizers.clip_vit` does for Hugging Face's CLIP; the copies are the packed qkv
linear (the same numbers) and none else: `proj` is a transposed *view*, held as the weight of the
head's projection. The head is `canonizers.ZeroShotHead`: the logits are open_clip's own image-text
logits (logit scale times the cosine of image and text embeddings), the text embeddings computed
once, in float64, by the model's own `encode_text` on a copy of the text tower.

Refused in one sentence each: towers that are not open_clip's `VisionTransformer` (timm trunks,
ModifiedResNet), attention pooling (`attentional_pool`, CoCa), `pool_type='none'`, no projection,
SigLIP's logit bias, and layer norms built for fp16/bf16 (`LayerNormFp32`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from .canonizers import ZeroShotHead, _as_buffer, _finish, _packed_qkv, _skeleton, zero_shot_prompts

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
#: the files of open_clip's own hub layout (what `open_clip.push_to_hf_hub` writes)
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _refuse(why: str):
    raise UserError(f"This open_clip model is not supported: {why}.")


def _check_tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if visual is None or type(visual).__name__ != "VisionTransformer" or not type(visual).__module__.startswith("open_clip"):
        _refuse(f"its image tower is a {type(visual).__name__} (a timm trunk or ResNet), not open_clip's VisionTransformer")
    if getattr(visual, "attn_pool", None) is not None:
        _refuse("its image tower pools with attention (attentional_pool, as in CoCa), which is not handled yet")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        _refuse(f"its image tower pools with {visual.pool_type!r}; the class token ('tok') and the average ('avg') are handled")
    if getattr(visual, "proj", None) is None:
        _refuse("its image tower has no projection (proj is None)")
    if getattr(model, "logit_bias", None) is not None:
        _refuse("it adds a logit bias (a SigLIP model), which the zero-shot head does not hold yet")
    norms = [visual.ln_pre, visual.ln_post] + [n for r in visual.transformer.resblocks for n in (r.ln_1, r.ln_2)]
    if any(type(n).__name__ == "LayerNormFp32" for n in norms):
        _refuse("its layer norms compute in float32 whatever the input (built for fp16/bf16): create it with precision='fp32'")
    for i, r in enumerate(visual.transformer.resblocks):
        mha = getattr(r, "attn", None)
        if type(r).__name__ != "ResidualAttentionBlock" or not isinstance(mha, nn.MultiheadAttention) or hasattr(r, "ln_1_kv"):
            _refuse(f"block {i} is a {type(r).__name__}, not a ResidualAttentionBlock with nn.MultiheadAttention")
        if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn or mha.in_proj_bias is None:
            _refuse(f"block {i}'s attention has separate q/k/v weights, added key/value biases or no projection bias")
        if set(dict(r.mlp.named_children())) != {"c_fc", "gelu", "c_proj"}:
            _refuse(f"block {i}'s MLP is not c_fc, activation, c_proj")
    return visual


def open_clip_vit(model: nn.Module, text_embeds: torch.Tensor, mean=None, std=None) -> nn.Module:
    """An open_clip `CLIP` / `CustomTextCLIP`'s image tower as a zero-shot classifier over
    `text_embeds` (one row per class: the model's text embeddings of the prompts), on a timm
    ViT skeleton sharing the model's modules."""
    visual = _check_tower(model)
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    first = blocks[0]
    pool = visual.pool_type
    sk = _skeleton(False, img_size=tuple(visual.image_size), patch_size=tuple(visual.patch_size),
                   in_chans=visual.conv1.in_channels, num_classes=text_embeds.shape[0], embed_dim=width,
                   depth=len(blocks), num_heads=first.attn.num_heads, mlp_ratio=first.mlp.c_fc.out_features / width,
                   qkv_bias=True, pre_norm=True, global_pool="avg" if pool == "avg" else "token", fc_norm=False)
    sk.patch_embed.proj = visual.conv1
    _as_buffer(sk, "cls_token", visual.class_embedding.view(1, 1, -1))
    _as_buffer(sk, "pos_embed", visual.positional_embedding.unsqueeze(0))
    sk.norm_pre = visual.ln_pre  # nn.Identity with no_ln_pre
    for blk, r in zip(sk.blocks, blocks):
        blk.norm1, blk.norm2 = r.ln_1, r.ln_2
        blk.attn.qkv, blk.attn.proj = _packed_qkv(r.attn), r.attn.out_proj
        blk.ls1, blk.ls2 = r.ls_1, r.ls_2  # open_clip's LayerScale (x * gamma) or nn.Identity
        blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2 = r.mlp.c_fc, r.mlp.gelu, r.mlp.c_proj
    if pool == "avg" and getattr(visual, "final_ln_after_pool", False):  # ln_post on the mean of the patch tokens
        sk.norm, sk.fc_norm = nn.Identity(), visual.ln_post
    else:  # ln_post on every token, then the class token or the mean (after the class token, ln_post is per token)
        sk.norm, sk.fc_norm = visual.ln_post, nn.Identity()
    w = visual.proj  # (width, output_dim), used as pooled @ proj
    with torch.device("meta"):
        proj = nn.Linear(w.shape[0], w.shape[1], bias=False)
    _as_buffer(proj, "weight", w.t())  # a view of proj: shared, not copied
    sk.head = ZeroShotHead(proj, text_embeds, model.logit_scale)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(mean if mean is not None else cfg.get("mean", OPENAI_MEAN))
    std = tuple(std if std is not None else cfg.get("std", OPENAI_STD))
    sk = _finish(sk, model, mean, std, "open_clip")
    sk.canonized_from = f"open_clip.{type(model).__name__}"
    return sk


def text_embeddings(model: nn.Module, tokenizer, texts) -> torch.Tensor:
    """open_clip's own text embeddings of `texts` (`encode_text`, not normalised), computed in float64
    on a copy of the model without its image tower."""
    tokens = tokenizer(list(texts))
    text = copy.deepcopy(model, memo={id(model.visual): nn.Identity()}).double().cpu().eval()
    with torch.no_grad():
        return text.encode_text(tokens.cpu())


def zero_shot_classifier(model: nn.Module, tokenizer, classes, prompt: str = "a photo of a {}", mean=None,
                         std=None) -> nn.Module:
    """An open_clip model as a classifier over `classes`: each class's text embedding is the model's
    embedding of `prompt` with the class name put in (`tokenizer` as `open_clip.get_tokenizer` gives
    it), and the logits are its image-text logits."""
    classes, texts = zero_shot_prompts(classes, prompt)
    _check_tower(model)
    view = open_clip_vit(model, text_embeddings(model, tokenizer, texts), mean, std)
    view.class_names = classes
    return view


# -- loading ------------------------------------------------------------------------------------------
def _build(model_cfg: dict) -> nn.Module:
    """open_clip's model class for a model config (as open_clip.create_model chooses it), in fp32."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    if "multimodal_cfg" in cfg:
        _refuse("it is a CoCa model, whose image tower pools with attention")
    if "timm_model_name" in cfg.get("vision_cfg", {}) or isinstance(cfg.get("vision_cfg", {}).get("layers"), (list, tuple)):
        _refuse("its image tower is a timm trunk or ResNet, not open_clip's VisionTransformer")
    text_cfg = cfg.get("text_cfg", {})
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        text_cfg["hf_model_pretrained"] = False  # the weights come with the model's own file
    custom = cfg.pop("custom_text", False) or hf_text
    try:
        return (CustomTextCLIP if custom else CLIP)(**cfg)
    except (TypeError, ValueError, AssertionError) as err:
        raise UserError(f"open_clip cannot build this model config ({type(err).__name__}: {err}).") from None


def _tokenizer(model_cfg: dict):
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    if "hf_tokenizer_name" in text_cfg:
        try:
            return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=length, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(f"The tokenizer {text_cfg['hf_tokenizer_name']!r} of this open_clip model is not in the local "
                            f"Hugging Face cache ({err}): download it once with network access.") from None
    return SimpleTokenizer(context_length=length, **kwargs)


def _load_weights(model: nn.Module, path: Path) -> None:
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_state_dict(str(path))
    except Exception as err:  # torch.load and safetensors raise several types for a damaged file
        raise UserError(f"Cannot read the open_clip weights in {path} ({type(err).__name__}: {err}): give a state dict "
                        f"(.safetensors, .bin, .pt; not OpenAI's TorchScript archive).") from None
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    state.pop("text.transformer.embeddings.position_ids", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise UserError(f"The weights in {path} do not fit this open_clip architecture ({str(err).splitlines()[-1].strip()}): "
                        f"check the name before the file.") from None
    if missing or unexpected:
        raise UserError(f"The weights in {path} do not fit this open_clip architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]}): check the name before the file.")


def load_open_clip(spec: str, classes, prompt: str = "a photo of a {}", random_weights: bool = False):
    """`--model open_clip:SPEC`: `ARCH:WEIGHTS_FILE` (an open_clip model name, e.g. ViT-B-32, and a local
    state dict file), `ARCH` with `random_weights`, or a FOLDER in open_clip's hub layout
    (open_clip_config.json with model_cfg and preprocess_cfg, and open_clip_model.safetensors or
    open_clip_pytorch_model.bin). Never touches the network."""
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip is not installed: `pip install open_clip_torch` (the test extras pin 2.23.0).") from None

    from .loading import LoadedModel, _hash_file, _random_init

    what = f"open_clip:{spec}"
    if isinstance(classes, str):
        classes = classes.split(",")
    if not classes:
        raise UserError(f"{what} is a zero-shot model: name its classes with --classes a,b,... (and optionally --prompt).")
    folder = Path(spec)
    preprocess = {}
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise UserError(f"The folder {folder} has no {CONFIG_FILE}: give a folder in open_clip's hub layout, or ARCH:WEIGHTS_FILE.")
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            model_cfg = config["model_cfg"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{folder / CONFIG_FILE} is not an open_clip config ({type(err).__name__}: {err}).") from None
        preprocess = config.get("preprocess_cfg", {}) or {}
        found = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
        weights = None if random_weights else (found[0] if found else None)
        if weights is None and not random_weights:
            raise UserError(f"The folder {folder} holds no {' or '.join(WEIGHT_FILES)}: add the weights, or pass --random-weights.")
    else:
        arch, _, file = spec.partition(":")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise UserError(f"open_clip has no model {arch!r}: give one of open_clip.list_models() (e.g. ViT-B-32, "
                            f"ViT-B-32-quickgelu), or a folder holding {CONFIG_FILE}.")
        if random_weights:
            weights = None
        elif not file:
            raise UserError(f"{what} names no weights: give a local file as open_clip:{arch}:FILE (a state dict, e.g. from "
                            f"open_clip's download cache), or pass --random-weights.")
        elif not Path(file).is_file():
            raise UserError(f"No open_clip weights file at {file!r}: open_clip:ARCH:FILE takes a local file (pretrained tags "
                            f"are not downloaded; fetch the file once with network access and give its path).")
        else:
            weights = Path(file)
    tokenizer = _tokenizer(model_cfg)
    if weights is None:
        model = _random_init(lambda: _build(model_cfg))
        weights_hash = label = "random-init"
    else:
        model = _build(model_cfg)
        _load_weights(model, weights)
        weights_hash, label = _hash_file(weights), f"checkpoint:{weights}"
    mean = tuple(preprocess.get("mean", OPENAI_MEAN))
    std = tuple(preprocess.get("std", OPENAI_STD))
    view = zero_shot_classifier(model.float().eval(), tokenizer, classes, prompt, mean=mean, std=std)
    return LoadedModel(model=view, name=what, mean=mean, std=std, input_size=(3, *view.patch_embed.img_size),
                       class_names=list(view.class_names), source=f"{what} prompt={prompt!r}",
                       weights_hash=weights_hash, weights=label)


def save_folder(model: nn.Module, model_cfg: dict, folder, preprocess_cfg: dict | None = None) -> Path:
    """Save `model` in open_clip's hub layout (what `open_clip:FOLDER` loads)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHT_FILES[0]))
    pre = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), **(preprocess_cfg or {})}
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=1))
    return folder
