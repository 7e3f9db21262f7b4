"""Other ViT implementations seen through timm's VisionTransformer layout ("canonizers").

Hugging Face's ViT / DeiT and torchvision's `vit_b_*` compute what timm's ViT computes, under other
module names, with q, k and v as three linears (HF) or one packed projection (torchvision). A
canonizer builds a timm `VisionTransformer` skeleton on the meta device (no memory) and puts the
model's own modules and parameters into it — shared, not copied — so that the ViT adapter and every
method run on them unchanged. The one copy is the fused qkv linear where the model keeps q, k and v
apart: the same numbers, concatenated. The tests check that the skeleton's recorded logits equal the
original model's own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _skeleton(distilled: bool, **kw) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        return (VisionTransformerDistilled if distilled else VisionTransformer)(**kw)


def _fused_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Linear:
    w = q.weight
    lin = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features, bias=q.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is not None:
            lin.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    return lin.requires_grad_(False)


def _packed_qkv(mha: nn.MultiheadAttention) -> nn.Linear:
    w = mha.in_proj_weight
    lin = nn.Linear(w.shape[1], w.shape[0], bias=mha.in_proj_bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if mha.in_proj_bias is not None:
            lin.bias.copy_(mha.in_proj_bias)
    return lin.requires_grad_(False)


def _finish(sk: nn.Module, source: nn.Module, mean, std, family: str) -> nn.Module:
    left = [n for n, p in sk.named_parameters() if p.is_meta] + [n for n, b in sk.named_buffers() if b.is_meta]
    if left:
        raise UserError(f"This {family} model has parts the canonizer does not map ({', '.join(left[:3])}): it is not supported yet.")
    sk.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std)}
    sk.canonized_from = type(source).__name__
    return sk.eval()


def hf_vit(model: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> nn.Module:
    """Hugging Face ViTForImageClassification, DeiTForImageClassification(WithTeacher)."""
    cfg = model.config
    core = getattr(model, "vit", None) or getattr(model, "deit", None)
    layers = getattr(core, "layers", None)
    if layers is None and hasattr(core, "encoder"):
        layers = core.encoder.layer  # transformers 4.x layout
    emb = core.embeddings
    distilled = hasattr(model, "distillation_classifier")
    if getattr(cfg, "hidden_act", "gelu") not in ("gelu",):
        raise UserError(f"This Hugging Face ViT uses the {cfg.hidden_act!r} activation: only GELU ViTs are supported.")
    image = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
    patch = cfg.patch_size if isinstance(cfg.patch_size, (tuple, list)) else (cfg.patch_size, cfg.patch_size)
    sk = _skeleton(distilled, img_size=tuple(image), patch_size=tuple(patch), in_chans=cfg.num_channels,
                   num_classes=cfg.num_labels, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
                   num_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
                   qkv_bias=cfg.qkv_bias)
    sk.patch_embed.proj = emb.patch_embeddings.projection
    sk.cls_token = emb.cls_token
    sk.pos_embed = emb.position_embeddings
    if distilled:
        sk.dist_token = emb.distillation_token
    for blk, layer in zip(sk.blocks, layers):
        att = layer.attention
        if hasattr(att, "q_proj"):  # transformers 5
            q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
            fc1, act, fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
        else:  # transformers 4
            q, k, v, o = att.attention.query, att.attention.key, att.attention.value, att.output.dense
            fc1, act, fc2 = layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense
        blk.norm1, blk.norm2 = layer.layernorm_before, layer.layernorm_after
        blk.attn.qkv, blk.attn.proj = _fused_qkv(q, k, v), o
        blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2 = fc1, act, fc2
    sk.norm = core.layernorm
    if distilled:
        sk.head, sk.head_dist = model.cls_classifier, model.distillation_classifier
    else:
        sk.head = model.classifier if hasattr(model, "classifier") else model.cls_classifier
    return _finish(sk, model, mean, std, "Hugging Face ViT")


def torchvision_vit(model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> nn.Module:
    """torchvision.models.VisionTransformer (vit_b_16, vit_b_32, vit_l_16, ...)."""
    heads = model.heads
    if getattr(heads, "pre_logits", None) is not None:
        raise UserError("This torchvision ViT has a representation layer before its head (pre_logits): it is not supported yet.")
    first = model.encoder.layers[0]
    d = model.hidden_dim
    sk = _skeleton(False, img_size=model.image_size, patch_size=model.patch_size, in_chans=model.conv_proj.in_channels,
                   num_classes=model.num_classes, embed_dim=d, depth=len(model.encoder.layers),
                   num_heads=first.self_attention.num_heads, mlp_ratio=model.mlp_dim / d, qkv_bias=True)
    sk.patch_embed.proj = model.conv_proj
    sk.cls_token = model.class_token
    sk.pos_embed = model.encoder.pos_embedding
    for blk, layer in zip(sk.blocks, model.encoder.layers):
        blk.norm1, blk.norm2 = layer.ln_1, layer.ln_2
        blk.attn.qkv, blk.attn.proj = _packed_qkv(layer.self_attention), layer.self_attention.out_proj
        blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2 = layer.mlp[0], layer.mlp[1], layer.mlp[3]
    sk.norm = model.encoder.ln
    sk.head = heads.head
    return _finish(sk, model, mean, std, "torchvision ViT")


class ZeroShotHead(nn.Module):
    """CLIP as a classifier: the image embedding (the visual projection of the pooled class token),
    L2-normalised, against each class's normalised text embedding, times CLIP's logit scale. The
    explained score is that scaled cosine similarity, CLIP's own logit.

    The class weights are kept in float64 outside the module's parameters (so a cast of the model
    to float32 and back cannot round them) and handed out in the dtype and device of the projection.
    """

    def __init__(self, proj: nn.Linear, text_embeds: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.proj = proj
        w = torch.nn.functional.normalize(text_embeds.detach().double(), dim=-1) * scale.detach().double().exp()
        self.class_weights = w.cpu()  # a plain attribute: not cast by .to(dtype)

    @property
    def classes(self) -> nn.Linear:
        w = self.proj.weight
        lin = nn.Linear(self.class_weights.shape[1], self.class_weights.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(self.class_weights.to(device=w.device, dtype=w.dtype), requires_grad=False)
        return lin

    @staticmethod
    def normalise(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(z, dim=-1)

    def forward(self, x):
        return self.classes(self.normalise(self.proj(x)))


def _as_buffer(module: nn.Module, name: str, value: torch.Tensor):
    """Put a view of another parameter (e.g. CLIP's (D,) class embedding as (1, 1, D)) where the
    skeleton has a parameter: the view shares the original's storage."""
    delattr(module, name)
    module.register_buffer(name, value.detach(), persistent=False)  # detached: a leaf, so the view can be deep-copied


def clip_vit(model: nn.Module, text_embeds: torch.Tensor, mean=(0.48145466, 0.4578275, 0.40821073),
             std=(0.26862954, 0.26130258, 0.27577711)) -> nn.Module:
    """Hugging Face CLIPModel's image tower as a zero-shot classifier over `text_embeds` (one row per
    class, CLIP's text embeddings of the prompts)."""
    vm = model.vision_model
    cfg = model.config.vision_config
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
        raise UserError(f"This CLIP image tower uses the {cfg.hidden_act!r} activation: only (quick) GELU towers are supported.")
    emb = vm.embeddings
    sk = _skeleton(False, img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels,
                   num_classes=text_embeds.shape[0], embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
                   num_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
                   qkv_bias=True, pre_norm=True)
    sk.patch_embed.proj = emb.patch_embedding
    _as_buffer(sk, "cls_token", emb.class_embedding.view(1, 1, -1))
    _as_buffer(sk, "pos_embed", emb.position_embedding.weight.unsqueeze(0))
    sk.norm_pre = vm.pre_layrnorm
    for blk, layer in zip(sk.blocks, vm.encoder.layers):
        att = layer.self_attn
        blk.norm1, blk.norm2 = layer.layer_norm1, layer.layer_norm2
        blk.attn.qkv, blk.attn.proj = _fused_qkv(att.q_proj, att.k_proj, att.v_proj), att.out_proj
        blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
    sk.norm = vm.post_layernorm  # per token, so on every token then the class token = on the pooled one
    sk.head = ZeroShotHead(model.visual_projection, text_embeds, model.logit_scale)
    return _finish(sk, model, mean, std, "CLIP")


def zero_shot_prompts(classes, prompt: str = "a photo of a {}"):
    """(class names, prompt texts) of a zero-shot classifier, checked (HF CLIP and open_clip alike)."""
    classes = [str(c).strip() for c in classes if str(c).strip()]
    if len(classes) < 2:
        raise UserError("A CLIP zero-shot classifier needs at least two classes: give them with --classes a,b,...")
    if "{}" not in prompt:
        raise UserError(f"The prompt {prompt!r} has no {{}} for the class name: write it like 'a photo of a {{}}'.")
    return classes, [prompt.format(c) for c in classes]


def zero_shot_classifier(model: nn.Module, tokenizer, classes, prompt: str = "a photo of a {}") -> nn.Module:
    """A CLIPModel as a classifier over `classes`: each class's text embedding is CLIP's embedding of
    `prompt` with the class name put in, and the logits are CLIP's image-text logits."""
    classes, texts = zero_shot_prompts(classes, prompt)
    import copy

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    # the text embeddings in float64 (a copy of the text tower), like every other number by default
    text = copy.deepcopy(nn.ModuleDict({"model": model.text_model, "proj": model.text_projection})).double().cpu().eval()
    with torch.no_grad():
        hidden = text["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        embeds = text["proj"](hidden.pooler_output)
    view = clip_vit(model, embeds)
    view.class_names = classes
    return view


class RelPosBias(nn.Module):
    """The additive attention bias of a BEiT block: its own relative position bias table, plus the
    model's shared one when it has one; (1, heads, N, N)."""

    def __init__(self, attn: nn.Module, shared: nn.Module | None):
        super().__init__()
        self.attn, self.shared = attn, shared

    def forward(self) -> torch.Tensor:
        bias = self.attn._get_rel_pos_bias() if self.attn.relative_position_bias_table is not None else 0
        if self.shared is not None:
            bias = bias + self.shared()
        return bias


def timm_beit(model: nn.Module) -> nn.Module:
    """timm's Beit (BEiT, BEiT v2): relative position bias per block (or shared), q and v biases
    without a k bias, layer scale, class-token or average pooling."""
    first = model.blocks[0]
    if type(first.mlp).__name__ != "Mlp":
        raise UserError(f"This BEiT has a {type(first.mlp).__name__} MLP: only the plain two-layer MLP is supported.")
    d = model.embed_dim
    pool = model.global_pool or "token"
    sk = _skeleton(False, img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
                   in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes, embed_dim=d,
                   depth=len(model.blocks), num_heads=first.attn.num_heads, mlp_ratio=first.mlp.fc1.out_features / d,
                   qkv_bias=True, init_values=1.0 if first.gamma_1 is not None else None,
                   global_pool=pool, fc_norm=False)
    sk.patch_embed.proj = model.patch_embed.proj
    sk.cls_token = model.cls_token
    if model.pos_embed is not None:
        sk.pos_embed = model.pos_embed
    else:  # relative positions only: an absolute embedding of zeros keeps the ViT layout
        _as_buffer(sk, "pos_embed", torch.zeros(1, model.patch_embed.num_patches + 1, d, dtype=model.cls_token.dtype,
                                                device=model.cls_token.device))
    for blk, src in zip(sk.blocks, model.blocks):
        a = src.attn
        blk.norm1, blk.norm2, blk.mlp = src.norm1, src.norm2, src.mlp
        qkv = nn.Linear(a.qkv.in_features, a.qkv.out_features, bias=True, device=a.qkv.weight.device, dtype=a.qkv.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(a.qkv.weight)
            if a.q_bias is not None:
                qkv.bias.copy_(torch.cat([a.q_bias, torch.zeros_like(a.q_bias) if a.k_bias is None else a.k_bias, a.v_bias]))
            else:
                qkv.bias.zero_()
        blk.attn.qkv = qkv.requires_grad_(False)
        blk.attn.proj = a.proj
        blk.attn.scale = a.scale
        blk.attn.rel_pos = RelPosBias(a, model.rel_pos_bias)
        if src.gamma_1 is not None:
            blk.ls1.gamma, blk.ls2.gamma = src.gamma_1, src.gamma_2
    sk.norm, sk.fc_norm, sk.head = model.norm, model.fc_norm, model.head
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return _finish(sk, model, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), "BEiT")


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fused_qkv_zero_missing(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Linear:
    """One qkv linear from three, where a projection without a bias (BEiT's key) gets a zero one."""
    w = q.weight
    lin = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        lin.bias.copy_(torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w.dtype, device=w.device)
                                  for p in (q, k, v)]))
    return lin.requires_grad_(False)


def _hf_layers(core: nn.Module, family: str):
    layers = getattr(core, "layers", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0].attention, "q_proj"):
        raise UserError(f"This {family} model has the transformers 4 layout: only the transformers 5 layout is supported.")
    return layers


class HFBeitRelPos(nn.Module):
    """A Hugging Face BEiT layer's additive attention bias: its own relative position bias and the
    model's shared one (either may be absent), as transformers computes them for the model's grid;
    (1, heads, N, N)."""

    def __init__(self, own: nn.Module | None, shared: nn.Module | None, grid: tuple):
        super().__init__()
        self.own, self.shared, self.grid = own, shared, tuple(grid)

    def forward(self) -> torch.Tensor:
        parts = [m(self.grid, interpolate_pos_encoding=False) for m in (self.own, self.shared) if m is not None]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def hf_beit(model: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> nn.Module:
    """Hugging Face BeitForImageClassification on timm's ViT layout: relative position bias per
    layer and/or shared (added to the attention logits), q and v biases without a k bias, layer
    scale, and either the class token with a final LayerNorm or the mean of the patch tokens with
    the pooler's LayerNorm (timm's fc_norm)."""
    cfg = model.config
    core = model.beit
    layers = _hf_layers(core, "Hugging Face BEiT")
    if getattr(cfg, "hidden_act", "gelu") != "gelu":
        raise UserError(f"This Hugging Face BEiT uses the {cfg.hidden_act!r} activation: only GELU models are supported.")
    if not isinstance(model.classifier, nn.Linear):
        raise UserError("This Hugging Face BEiT has no classifier (num_labels=0): it is not an image classifier.")
    image, patch = _pair(cfg.image_size), _pair(cfg.patch_size)
    grid = (image[0] // patch[0], image[1] // patch[1])
    mean_pool = bool(cfg.use_mean_pooling)
    scaled = isinstance(layers[0].lambda_1, nn.Parameter)
    first = layers[0]
    sk = _skeleton(False, img_size=image, patch_size=patch, in_chans=cfg.num_channels, num_classes=cfg.num_labels,
                   embed_dim=cfg.hidden_size, depth=len(layers), num_heads=cfg.num_attention_heads,
                   mlp_ratio=first.mlp.fc1.out_features / cfg.hidden_size, qkv_bias=True,
                   init_values=1.0 if scaled else None, global_pool="avg" if mean_pool else "token", fc_norm=mean_pool)
    emb = core.embeddings
    sk.patch_embed.proj = emb.patch_embeddings.projection
    sk.cls_token = emb.cls_token
    if emb.position_embeddings is not None:
        sk.pos_embed = emb.position_embeddings
    else:  # relative positions only: an absolute embedding of zeros keeps the ViT layout
        _as_buffer(sk, "pos_embed", torch.zeros(1, grid[0] * grid[1] + 1, cfg.hidden_size, dtype=emb.cls_token.dtype,
                                                device=emb.cls_token.device))
    for blk, layer in zip(sk.blocks, layers):
        a = layer.attention
        if a.head_dim != blk.attn.head_dim:
            raise UserError(f"This Hugging Face BEiT has heads of width {a.head_dim} (not hidden/heads): it is not supported yet.")
        blk.norm1, blk.norm2 = layer.layernorm_before, layer.layernorm_after
        blk.attn.qkv, blk.attn.proj = _fused_qkv_zero_missing(a.q_proj, a.k_proj, a.v_proj), a.o_proj
        blk.attn.scale = a.scaling
        if layer.relative_position_bias is not None or core.shared_position_bias is not None:
            blk.attn.rel_pos = HFBeitRelPos(layer.relative_position_bias, core.shared_position_bias, grid)
        blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
        if scaled:
            blk.ls1.gamma, blk.ls2.gamma = layer.lambda_1, layer.lambda_2
    sk.norm = core.layernorm  # Identity with mean pooling
    sk.fc_norm = core.pooler.layernorm if mean_pool else nn.Identity()
    sk.head = model.classifier
    return _finish(sk, model, mean, std, "Hugging Face BEiT")


def hf_swin(model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> nn.Module:
    """Hugging Face SwinForImageClassification on a timm `SwinTransformer` skeleton (the Swin
    adapter). The two compute the same: the same window partition, cyclic shift by -⌊window/2⌋ on
    odd blocks, -100 mask between shifted regions, relative position index and bias table layout,
    and the same 2x2 patch-merging order (rows 0,1 of column 0, then of column 1); Hugging Face
    merges at the end of a stage, timm at the start of the next, the same sequence of ops. Only the
    separate q, k, v linears are concatenated (a copy); every other module is the model's own."""
    from timm.models.swin_transformer import SwinTransformer, get_relative_position_index

    cfg = model.config
    core = model.swin
    if getattr(cfg, "hidden_act", "gelu") != "gelu":
        raise UserError(f"This Hugging Face Swin uses the {cfg.hidden_act!r} activation: only GELU models are supported.")
    if not isinstance(model.classifier, nn.Linear):
        raise UserError("This Hugging Face Swin has no classifier (num_labels=0): it is not an image classifier.")
    image, patch = _pair(cfg.image_size), _pair(cfg.patch_size)
    if image[0] % patch[0] or image[1] % patch[1]:
        raise UserError(f"This Hugging Face Swin pads its {image} images to whole {patch} patches: it is not supported yet.")
    with torch.device("meta"):
        sk = SwinTransformer(img_size=image, patch_size=patch, in_chans=cfg.num_channels, num_classes=cfg.num_labels,
                             embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                             window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                             drop_path_rate=0.0)
    emb = core.embeddings
    sk.patch_embed.proj, sk.patch_embed.norm = emb.patch_embeddings.projection, emb.norm
    if emb.position_embeddings is not None:  # added after the embedding's norm (read by the Swin adapter)
        sk.absolute_pos_embed = emb.position_embeddings
    stages = core.encoder.layers
    for s, (stage, hf_stage) in enumerate(zip(sk.layers, stages)):
        if s > 0:  # Hugging Face's downsample ends the previous stage
            merge = stages[s - 1].downsample
            stage.downsample.norm, stage.downsample.reduction = merge.norm, merge.reduction
        for blk, layer in zip(stage.blocks, hf_stage.blocks):
            a = layer.attention
            res = tuple(blk.input_resolution)
            clamp = min(res) <= layer.window_size
            win = (min(res),) * 2 if clamp else (layer.window_size,) * 2
            shift = (0, 0) if clamp else (layer.shift_size,) * 2
            table = a.relative_position_bias.relative_position_bias_table
            if (win, shift) != (tuple(blk.window_size), tuple(blk.shift_size)) or table.shape != blk.attn.relative_position_bias_table.shape:
                raise UserError(f"Stage {s} of this Hugging Face Swin has a {res} grid whose windows transformers and timm "
                                f"cut differently: it is not supported yet.")
            blk.norm1, blk.norm2 = layer.layernorm_before, layer.layernorm_after
            blk.attn.qkv, blk.attn.proj = _fused_qkv(a.q_proj, a.k_proj, a.v_proj), a.o_proj
            blk.attn.relative_position_bias_table = table
            blk.attn.scale = a.scaling
            blk.attn.register_buffer("relative_position_index", get_relative_position_index(*win, device=table.device),
                                     persistent=False)
            blk.register_buffer("attn_mask", blk.get_attn_mask(device=table.device, dtype=table.dtype), persistent=False)
            blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
    sk.norm = core.layernorm
    sk.head.fc = model.classifier
    return _finish(sk, model, mean, std, "Hugging Face Swin")


#: class name -> canonizer (torchvision's class is also called VisionTransformer: told apart by module)
HF_VISION = {"ViTForImageClassification": hf_vit, "DeiTForImageClassification": hf_vit,
             "DeiTForImageClassificationWithTeacher": hf_vit, "Beit": timm_beit,
             "BeitForImageClassification": hf_beit, "SwinForImageClassification": hf_swin}


def canonize(model: nn.Module):
    """The timm-layout view of `model`, or None when `model` needs no canonizer."""
    name = type(model).__name__
    if name in HF_VISION:
        return HF_VISION[name](model)
    if name == "VisionTransformer" and type(model).__module__.startswith("torchvision"):
        return torchvision_vit(model)
    if name in ("CLIP", "CustomTextCLIP", "CoCa") and type(model).__module__.startswith("open_clip"):
        raise UserError("An open_clip model is not a classifier by itself: make one with "
                        "transexplain.models.open_clip.zero_shot_classifier(model, tokenizer, classes), "
                        "or give --model open_clip:ARCH:WEIGHTS --classes a,b,...")
    if name == "CLIPModel":
        raise UserError("A CLIPModel is not a classifier by itself: make one with "
                        "transexplain.models.canonizers.zero_shot_classifier(model, tokenizer, classes), "
                        "or give --model clip:PATH --classes a,b,...")
    return None
