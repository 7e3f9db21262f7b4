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
    left = [n for n, p in sk.named_parameters() if p.is_meta]
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


#: class name -> canonizer (torchvision's class is also called VisionTransformer: told apart by module)
HF_VISION = {"ViTForImageClassification": hf_vit, "DeiTForImageClassification": hf_vit,
             "DeiTForImageClassificationWithTeacher": hf_vit}


def canonize(model: nn.Module):
    """The timm-layout view of `model`, or None when `model` needs no canonizer."""
    name = type(model).__name__
    if name in HF_VISION:
        return HF_VISION[name](model)
    if name == "VisionTransformer" and type(model).__module__.startswith("torchvision"):
        return torchvision_vit(model)
    return None
