"""Every model family the adapters handle, each with a tiny random instance (for the model x method
support matrix of `tx-bench methods --models` and docs/models.md, computed by running the refusal
check on a real instance of each family, never written by hand)."""
from __future__ import annotations

import torch


def _timm_vit(**kw):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16, depth=1,
                             num_heads=2, num_classes=3, **kw)


def _timm_deit_distilled():
    import timm

    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4,
                             embed_dim=16, depth=1, num_heads=2, num_classes=3)


def _timm_beit():
    import timm

    return timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16, depth=1,
                             num_heads=2, num_classes=3)


def _timm_swin():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=2,
                             embed_dim=8, depths=(1, 1), num_heads=(1, 1), num_classes=3)


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32, num_labels=3))


def _hf_deit_teacher():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(DeiTConfig(image_size=16, patch_size=4, hidden_size=16,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            intermediate_size=32, num_labels=3))


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3)


def _clip():
    from transformers import CLIPConfig, CLIPModel

    from .canonizers import clip_vit

    config = CLIPConfig(text_config=dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=20, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32), projection_dim=8)
    return clip_vit(CLIPModel(config), torch.randn(3, 8))


def _text(kind):
    def build():
        import transformers

        tiny = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=40, num_labels=3)
        if kind == "electra":
            tiny["embedding_size"] = 16
        if kind == "distilbert":
            return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
                vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=40, num_labels=3))
        config = getattr(transformers, f"{kind.capitalize()}Config")(**tiny)
        return getattr(transformers, f"{kind.capitalize()}ForSequenceClassification")(config)

    return build


#: family -> (what `--model` takes for it, a builder of a tiny random instance)
FAMILIES = {
    "timm ViT / DeiT (class token)": ("a timm name, e.g. vit_base_patch16_224", _timm_vit),
    "timm DeiT distilled": ("deit_*_distilled_*", _timm_deit_distilled),
    "timm ViT with registers": ("vit_*_reg4_*", lambda: _timm_vit(reg_tokens=4)),
    "timm ViT, average pooling": ("global_pool='avg' ViTs", lambda: _timm_vit(class_token=False, global_pool="avg")),
    "timm BEiT": ("beit_*, beitv2_*", _timm_beit),
    "timm Swin": ("swin_*", _timm_swin),
    "Hugging Face ViT": ("hf:NAME_OR_FOLDER", _hf_vit),
    "Hugging Face DeiT with teacher": ("hf:NAME_OR_FOLDER", _hf_deit_teacher),
    "torchvision ViT": ("torchvision:vit_b_16, ...", _torchvision_vit),
    "CLIP zero-shot (Hugging Face)": ("clip:NAME_OR_FOLDER --classes a,b", _clip),
    "BERT classifier": ("a local Hugging Face folder (eraser)", _text("bert")),
    "RoBERTa classifier": ("a local Hugging Face folder (eraser)", _text("roberta")),
    "ELECTRA classifier": ("a local Hugging Face folder (eraser)", _text("electra")),
    "DistilBERT classifier": ("a local Hugging Face folder (eraser)", _text("distilbert")),
}


def family_matrix() -> dict:
    """{family: {method: None (runs) or the refusal sentence}} from a tiny instance of each family."""
    from ..explainers import method_names
    from ..explainers.base import refusal
    from .registry import as_adapter

    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for family, (_, build) in FAMILIES.items():
            adapter = as_adapter(build().eval())
            out[family] = {m: refusal(m, adapter) for m in method_names()}
    return out


def matrix_markdown() -> str:
    """The model family x method matrix as a markdown table (methods as rows)."""
    from ..explainers import method_names

    matrix = family_matrix()
    families = list(matrix)
    lines = ["| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for m in method_names():
        lines.append(f"| `{m}` | " + " | ".join("yes" if matrix[f][m] is None else "no" for f in families) + " |")
    reasons = sorted({r for row in matrix.values() for r in row.values() if r})
    if reasons:
        lines += ["", "Why not:", ""] + [f"- {r}" for r in reasons]
    return "\n".join(lines) + "\n"
