"""load_model with a timm name: real weights from the local cache, a one-line error within seconds
when they are not cached (never the network), random weights only when asked for."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from transexplain.errors import UserError  # noqa: E402
from transexplain.models.loading import load_model  # noqa: E402

ARCH = "vit_tiny_patch16_224"
TAG = "augreg_in21k_ft_in1k"  # timm's default weights for ARCH
REPO = f"timm/{ARCH}.{TAG}"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Hub and torch caches that hold nothing; any download attempt fails the test."""
    import huggingface_hub.constants as hf_constants
    import timm.models._hub as timm_hub

    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(timm_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(timm_hub, "download_url_to_file", no_network, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return hub


def put_in_hub_cache(hub: Path, repo: str, state: dict) -> Path:
    """Write `state` as model.safetensors the way huggingface_hub lays out its cache."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    path = snap / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_timm_name_loads_the_cached_pretrained_weights(empty_caches):
    import timm

    torch.manual_seed(123)
    reference = timm.create_model(ARCH, pretrained=False)
    cached = put_in_hub_cache(empty_caches, REPO, reference.state_dict())
    loaded = load_model(ARCH)
    assert loaded.weights == f"pretrained:{TAG}"
    from transexplain.models.loading import _hash_file

    assert loaded.weights_hash == _hash_file(cached)
    got, want = loaded.model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert not loaded.model.training


def test_cached_weights_with_another_head_keep_the_backbone(empty_caches):
    import timm

    torch.manual_seed(5)
    reference = timm.create_model(ARCH, pretrained=False)
    put_in_hub_cache(empty_caches, REPO, reference.state_dict())
    loaded = load_model(ARCH, num_classes=7)
    assert loaded.model.head.out_features == 7
    torch.testing.assert_close(loaded.model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight, rtol=0, atol=0)


def test_not_cached_is_one_line_within_seconds(empty_caches):
    t0 = time.time()
    with pytest.raises(UserError) as exc:
        load_model(ARCH)
    assert time.time() - t0 < 10
    msg = str(exc.value)
    assert "\n" not in msg
    assert ARCH in msg and "not in the local cache" in msg and str(empty_caches) in msg
    assert "--random-weights" in msg and "pretrained=True" in msg


def test_damaged_cached_file_is_a_user_error(empty_caches):
    cached = put_in_hub_cache(empty_caches, REPO, {"x": torch.zeros(2)})
    cached.write_bytes(cached.read_bytes()[:20])
    with pytest.raises(UserError) as exc:
        load_model(ARCH)
    assert str(cached) in str(exc.value) and "download it again" in str(exc.value)


def test_random_weights_only_when_asked_and_the_same_every_time(empty_caches):
    a = load_model(ARCH, random_weights=True)
    b = load_model(ARCH, random_weights=True)
    assert a.weights == "random-init" and a.weights_hash == "random-init"
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], rtol=0, atol=0, msg=k)
    # the old spelling still means random weights
    assert load_model(ARCH, pretrained=False).weights == "random-init"


def test_random_weights_with_a_checkpoint_keep_its_architecture():
    loaded = load_model("embedded", random_weights=True)
    trained = load_model("embedded")
    assert loaded.weights == "random-init" and trained.weights == "embedded:embedded"
    assert loaded.input_size == trained.input_size and loaded.class_names == trained.class_names
    w, t = loaded.model.state_dict(), trained.model.state_dict()
    assert w.keys() == t.keys()
    assert any(not torch.equal(w[k], t[k]) for k in t)


def test_explain_cli_says_weights_are_not_cached_without_touching_the_network(tmp_path):
    """Through the real entry point, without HF_HUB_OFFLINE: no network retries, one line, rc 2."""
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"))
    entry = Path(sys.executable).parent / "tx-bench"
    t0 = time.time()
    out = subprocess.run([str(entry), "explain", str(img), "--model", ARCH, "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    elapsed = time.time() - t0
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local cache" in lines[0] and "--random-weights" in lines[0]
    assert elapsed < 45, elapsed
    assert not (tmp_path / "o").exists()


def test_explain_cli_random_weights_flag(tmp_path):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(img)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch")}
    entry = Path(sys.executable).parent / "tx-bench"
    out = subprocess.run([str(entry), "explain", str(img), "--model", ARCH, "--random-weights", "--method", "rollout",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "img.rollout.npy").exists()
