import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def spread_weights(model, scale: float, is_norm=lambda name: "norm" in name) -> None:
    """Redraw every parameter (from the global RNG, in parameter order): normalisation gains 1 ± 0.1,
    everything else scale·N(0, 1), so that attention is peaked and biases are not zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm(name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))


def make_vit(depth=2, heads=2, dim=16, img=(16, 16), patch=4, classes=5, dtype=torch.float64, seed=0, **kw):
    """A small random-weight timm ViT whose weights are spread enough to make attention peaked."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch, embed_dim=dim,
        depth=depth, num_heads=heads, num_classes=classes, qkv_bias=True, **kw,
    )
    spread_weights(model, 0.5)
    return model.to(dtype).eval()


def rollout_reference(attentions):
    """(B, N, N) attention rollout written out from a model's own attention probabilities (one
    (B, H, N, N) tensor per block, in order): the product of the row-normalised (mean-head A + I)."""
    n = attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    joint = eye.expand(attentions[0].shape[0], n, n)
    for a in attentions:
        m = a.detach().mean(1) + eye
        joint = (m / m.sum(-1, keepdim=True)) @ joint
    return joint


@pytest.fixture
def vit64():
    return make_vit()


def make_tiny_bert():
    """A 2-layer float64 BERT classifier (3 classes, vocabulary 50) with spread weights: a fresh
    BERT's biases are zero and its LayerNorm weights one, which would hide mistakes."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=3, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                     intermediate_size=32, vocab_size=50)
    model = BertForSequenceClassification(cfg).eval().double()
    spread_weights(model, 0.3, lambda name: "LayerNorm" in name)
    return model


def make_text_batch(rows: int = 2):
    """(ids, mask) of `rows` 7-token texts for `make_tiny_bert`: [CLS]-like id 2 first, the second
    text padded after 4 tokens, the third (if any) after 6."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (rows, 7), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    if rows > 2:
        mask[2, 6:] = 0
    return ids * mask, mask
