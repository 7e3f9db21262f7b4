"""Every model family the adapters handle, each with a tiny random instance (for the model x method
support matrix of `tx-bench methods --models` and docs/models.md, computed by running the refusal
check on a real instance of each family, never written by hand)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

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


def _timm_swinv2():
    import timm

    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, patch_size=4, window_size=2,
                             embed_dim=8, depths=(1, 1), num_heads=(1, 1), num_classes=3)


def _timm_eva02():
    import timm

    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16, depth=1,
                             num_heads=2, num_classes=3, ref_feat_shape=(4, 4))


def _hf_swin():
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                                 window_size=2, num_labels=3))


def _hf_beit():
    from transformers import BeitConfig, BeitForImageClassification

    return BeitForImageClassification(BeitConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                 use_relative_position_bias=True))


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3)


def _clip_model(vocab_size: int = 50):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=20, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32), projection_dim=8)
    return CLIPModel(config)


def _clip():
    from .canonizers import clip_vit

    return clip_vit(_clip_model(), torch.randn(3, 8))


#: a tiny open_clip CLIP (OpenAI's layout: class token, QuickGELU; open_clip's BPE vocabulary)
OPEN_CLIP_CFG = dict(embed_dim=8, quick_gelu=True,
                     vision_cfg=dict(image_size=16, patch_size=4, width=16, layers=1, head_width=8, mlp_ratio=2.0),
                     text_cfg=dict(context_length=16, vocab_size=49408, width=16, heads=2, layers=1))


def _open_clip_model():
    from open_clip.model import CLIP

    return CLIP(**OPEN_CLIP_CFG)


def _open_clip():
    from .open_clip import open_clip_vit

    return open_clip_vit(_open_clip_model(), torch.randn(3, 8))


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


def _deberta():
    """DeBERTa-v3's layout (v2's code): shared relative key/query projections, log buckets,
    LayerNorm'd relative embeddings, no absolute positions, content-to-position and back."""
    import transformers

    config = transformers.DebertaV2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=40, num_labels=3,
                                          relative_attention=True, pos_att_type="p2c|c2p", position_buckets=8,
                                          max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
                                          position_biased_input=False, type_vocab_size=0)
    return transformers.DebertaV2ForSequenceClassification(config)


#: family -> (what `--model` takes for it, a builder of a tiny random instance)
FAMILIES = {
    "timm ViT / DeiT (class token)": ("a timm name, e.g. vit_base_patch16_224", _timm_vit),
    "timm DeiT distilled": ("deit_*_distilled_*", _timm_deit_distilled),
    "timm ViT with registers": ("vit_*_reg4_*", lambda: _timm_vit(reg_tokens=4)),
    "timm ViT, average pooling": ("global_pool='avg' ViTs", lambda: _timm_vit(class_token=False, global_pool="avg")),
    "timm BEiT": ("beit_*, beitv2_*", _timm_beit),
    "timm Swin": ("swin_*", _timm_swin),
    "timm Swin V2": ("swinv2_*", _timm_swinv2),
    "timm EVA-02": ("eva02_*", _timm_eva02),
    "Hugging Face ViT": ("hf:NAME_OR_FOLDER", _hf_vit),
    "Hugging Face DeiT with teacher": ("hf:NAME_OR_FOLDER", _hf_deit_teacher),
    "Hugging Face Swin": ("hf:NAME_OR_FOLDER", _hf_swin),
    "Hugging Face BEiT": ("hf:NAME_OR_FOLDER", _hf_beit),
    "torchvision ViT": ("torchvision:vit_b_16, ...", _torchvision_vit),
    "CLIP zero-shot (Hugging Face)": ("clip:NAME_OR_FOLDER --classes a,b", _clip),
    "CLIP zero-shot (open_clip)": ("open_clip:ARCH:FILE or open_clip:FOLDER --classes a,b", _open_clip),
    "BERT classifier": ("a local Hugging Face folder (eraser)", _text("bert")),
    "RoBERTa classifier": ("a local Hugging Face folder (eraser)", _text("roberta")),
    "ELECTRA classifier": ("a local Hugging Face folder (eraser)", _text("electra")),
    "DistilBERT classifier": ("a local Hugging Face folder (eraser)", _text("distilbert")),
    "DeBERTa-v2 classifier": ("a local Hugging Face folder (eraser)", _deberta),
}


if __import__("importlib.util").util.find_spec("open_clip") is None:  # open_clip_torch is a test extra
    del FAMILIES["CLIP zero-shot (open_clip)"]


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


# -- a tiny instance of each family where the CLI loads it ---------------------------------------------
@dataclass
class CliInstance:
    """A family's tiny random instance saved where `--model` loads it (tests/test_every_family.py,
    the per-family benchmarks): `args` is `--model ...` and whatever else that family needs."""

    family: str
    kind: str  # "vision" (explain IMAGE, perturb) or "text" (explain --text, eraser)
    args: list
    num_classes: int
    class_names: list = field(default_factory=list)  # CLIP: the zero-shot classes given with --classes


@contextlib.contextmanager
def _recorded_timm_calls():
    """Record timm.create_model's (name, kwargs) while a builder runs: what a checkpoint's config.json needs."""
    import timm

    calls, original = [], timm.create_model

    def create_model(name, *args, **kwargs):
        calls.append((name, dict(kwargs)))
        return original(name, *args, **kwargs)

    timm.create_model = create_model
    try:
        yield calls
    finally:
        timm.create_model = original


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _save_checkpoint(folder: Path, model, architecture: str, kwargs: dict, num_classes: int, input_size) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    cfg = {"architecture": architecture, "model_kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
           "num_classes": int(num_classes), "input_size": list(input_size), "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def _clip_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (lowercase letters; anything else is unknown)."""
    import string

    from transformers import CLIPTokenizer

    toks = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    return tok


#: class names of the CLIP instance's zero-shot classifier
CLIP_CLASSES = ("cat", "dog", "car")


def save_cli_instance(family: str, folder, seed: int = 0) -> CliInstance:
    """Save `family`'s tiny random instance (seeded) in `folder` where the CLI loads it.

    timm models (whatever the builder passed to timm.create_model) become a checkpoint folder
    (config.json + model.safetensors), torchvision's ViT a checkpoint folder naming its class,
    Hugging Face image classifiers a save_pretrained folder (`hf:`), CLIP a folder with a
    character-level tokenizer (`clip: --classes`), and text classifiers a save_pretrained folder
    with MiniLM's WordPiece tokenizer, rebuilt with that vocabulary and the two unnamed classes of
    the embedded reviews (the ERASER runner maps them to NEG, POS)."""
    from .registry import as_adapter

    folder = Path(folder)
    _, build = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _recorded_timm_calls() as calls:
            model = build().eval()
        name = type(model).__name__
        if getattr(model, "canonized_from", None) == "CLIPModel":
            tok = _clip_tokenizer(folder)
            torch.manual_seed(seed)
            _clip_model(vocab_size=len(tok)).save_pretrained(folder)
            return CliInstance(family, "vision", ["--model", f"clip:{folder}", "--classes", ",".join(CLIP_CLASSES)],
                               len(CLIP_CLASSES), list(CLIP_CLASSES))
        if str(getattr(model, "canonized_from", "")).startswith("open_clip."):
            from .open_clip import save_folder

            torch.manual_seed(seed)
            save_folder(_open_clip_model(), OPEN_CLIP_CFG, folder)
            return CliInstance(family, "vision", ["--model", f"open_clip:{folder}", "--classes", ",".join(CLIP_CLASSES)],
                               len(CLIP_CLASSES), list(CLIP_CLASSES))
        if name.endswith("ForSequenceClassification"):
            from transformers import AutoTokenizer

            from .text import minilm_dir

            tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
            config = model.config
            config.vocab_size, config.num_labels, config.pad_token_id = tok.vocab_size, 2, tok.pad_token_id
            torch.manual_seed(seed)
            type(model)(config).save_pretrained(folder)
            tok.save_pretrained(folder)
            return CliInstance(family, "text", ["--model", str(folder)], 2)
        adapter = as_adapter(model)
        if calls:
            arch, kwargs = calls[-1]
            kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes")}
            _save_checkpoint(folder, model, arch, kwargs, adapter.num_classes, adapter.input_size)
            return CliInstance(family, "vision", ["--model", str(folder)], adapter.num_classes)
        if name == "VisionTransformer" and type(model).__module__.startswith("torchvision"):
            kwargs = dict(image_size=model.image_size, patch_size=model.patch_size, num_layers=len(model.encoder.layers),
                          num_heads=model.encoder.layers[0].num_heads, hidden_dim=model.hidden_dim, mlp_dim=model.mlp_dim)
            _save_checkpoint(folder, model, "torchvision:VisionTransformer", kwargs, model.num_classes, adapter.input_size)
            return CliInstance(family, "vision", ["--model", str(folder)], adapter.num_classes)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(folder)
            return CliInstance(family, "vision", ["--model", f"hf:{folder}"], adapter.num_classes)
    raise ValueError(f"No CLI form for the family {family!r} ({name}): teach families.save_cli_instance to save it.")
