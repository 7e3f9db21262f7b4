import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_vit(depth=2, heads=2, dim=16, img=(16, 16), patch=4, classes=5, dtype=torch.float64, seed=0, **kw):
    """A small random-weight timm ViT whose weights are spread enough to make attention peaked."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch, embed_dim=dim,
        depth=depth, num_heads=heads, num_classes=classes, qkv_bias=True, **kw,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
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
