"""`tx-bench explain` and `tx-bench methods` end to end, in a subprocess, with bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_vit

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tx(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "transexplain.cli", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ckpt")
    model = make_vit(depth=2, img=(32, 32), patch=8, classes=3, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 3, "input_size": [3, 32, 32],
           "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "qkv_bias": True},
           "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": ["alpha", "beta", "gamma"]}
    (d / "config.json").write_text(json.dumps(cfg))
    return d, model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="RGBA").save(d / "rgba.png")
    (d / "broken.png").write_bytes(b"not an image at all")
    return d, paths


def test_methods_lists_every_method():
    out = tx("methods")
    assert out.returncode == 0
    for name in ("raw_attention", "rollout", "gradcam", "partial_lrp", "full_lrp", "transformer_attribution", "generic_attention", "ln_stats", "random"):
        assert name in out.stdout


def test_help_is_complete():
    out = tx("--help")
    assert out.returncode == 0 and "explain" in out.stdout and "methods" in out.stdout
    out = tx("explain", "--help")
    assert out.returncode == 0 and "--method" in out.stdout and "--target" in out.stdout


def test_explain_writes_png_and_raw_map(checkpoint, images, tmp_path):
    ckpt, model = checkpoint
    _, paths = images
    out = tx("explain", *paths, "--model", ckpt, "--method", "transformer_attribution", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "predicted class" in out.stdout
    for p in paths:
        raw = np.load(tmp_path / f"{p.stem}.transformer_attribution.npy")
        assert raw.shape == (4, 4)
        assert (tmp_path / f"{p.stem}.transformer_attribution.png").stat().st_size > 0
    # the raw map is what the Python API gives on the same preprocessed image
    import transexplain
    from transexplain.visualize import preprocess, read_rgb_image

    x = preprocess(read_rgb_image(paths[0]), (3, 32, 32), (0.5,) * 3, (0.5,) * 3).unsqueeze(0)
    expected = transexplain.explain(model, x, "transformer_attribution").token_map[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / f"{paths[0].stem}.transformer_attribution.npy"), expected, rtol=1e-5, atol=1e-7)


def test_explain_all_methods_grid(checkpoint, images, tmp_path):
    ckpt, _ = checkpoint
    _, paths = images
    out = tx("explain", paths[0], "--model", ckpt, "--methods", "all", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "comparison.png").exists()
    from transexplain.explainers import method_names

    assert sorted(p.name for p in tmp_path.glob("*.npy")) == sorted(f"img0.{m}.npy" for m in method_names())


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/rgba.png"], "alpha channel"),
        (["{d}/broken.png"], "Cannot read"),
        (["{d}/missing.png"], "does not exist"),
        (["{d}/img0.png", "--method", "nonsense"], "Unknown method"),
        (["{d}/img0.png", "--target", "7"], "out of range"),
        (["{d}/img0.png", "--model", "no_such_model_name"], "Unknown model"),
    ],
)
def test_bad_input_gives_one_sentence(checkpoint, images, tmp_path, args, message):
    ckpt, _ = checkpoint
    d, _ = images
    args = [a.format(d=d) for a in args]
    if "--model" not in args:
        args += ["--model", str(ckpt)]
    out = tx("explain", *args, "--out", tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(checkpoint, images, tmp_path):
    ckpt, _ = checkpoint
    d, _ = images
    out = tx("--debug", "explain", d / "rgba.png", "--model", ckpt, "--out", tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_api_rejects_wrong_shapes(checkpoint):
    import transexplain
    from transexplain import UserError

    _, model = checkpoint
    with pytest.raises(UserError, match="32x32"):
        transexplain.explain(model, torch.randn(1, 3, 40, 40))
    with pytest.raises(UserError, match="channels"):
        transexplain.explain(model, torch.randn(1, 1, 32, 32))
    with pytest.raises(UserError, match="out of range"):
        transexplain.explain(model, torch.randn(1, 3, 32, 32), target=3)


def test_unsupported_models_are_refused_by_name():
    import timm

    import transexplain
    from transexplain import UserError

    # DeiT-distilled and average-pooled ViTs are supported now (tests/test_vit_families.py); these are not
    map_pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, global_pool="map", num_classes=3)
    with pytest.raises(UserError, match="MAP head.*Supported architectures"):
        transexplain.as_adapter(map_pooled)
    # EVA-02 is supported now (tests/test_families_new.py); a convolutional network is not a Transformer
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    with pytest.raises(UserError, match="not supported: ResNet.*Supported architectures"):
        transexplain.as_adapter(resnet)
    with pytest.raises(UserError, match="not supported"):
        transexplain.as_adapter(torch.nn.Linear(3, 3))


def _two_same_named_images(root):
    rng = np.random.default_rng(1)
    paths = []
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        paths.append(root / folder / "img.png")
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("grid", [False, True], ids=["one-method", "grid"])
def test_inputs_with_the_same_file_name_keep_every_output(checkpoint, tmp_path, grid):
    """a/img.png and b/img.png used to write the same img.<method>.* and keep only the last one's."""
    ckpt, model = checkpoint
    paths = _two_same_named_images(tmp_path / "in")
    out_dir = tmp_path / "out"
    extra = ["--methods", "rollout,transformer_attribution"] if grid else ["--method", "transformer_attribution"]
    out = tx("explain", *paths, "--model", ckpt, *extra, "--out", out_dir)
    assert out.returncode == 0, out.stderr
    maps = sorted(out_dir.glob("*.transformer_attribution.npy"))
    assert len(maps) == 2
    # each output is the map of its own input, and the command says which file went where
    import transexplain
    from transexplain.visualize import preprocess, read_rgb_image

    for p in paths:
        written = [m for m in maps if f"{p.parent.name}_img" in m.name]
        assert len(written) == 1 and f"{written[0].name.split('.')[0]}" in out.stdout and str(p) in out.stdout
        x = preprocess(read_rgb_image(p), (3, 32, 32), (0.5,) * 3, (0.5,) * 3).unsqueeze(0)
        expected = transexplain.explain(model, x, "transformer_attribution").token_map[0].numpy()
        np.testing.assert_allclose(np.load(written[0]), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.load(maps[0]), np.load(maps[1]))
    if not grid:
        assert len(list(out_dir.glob("*.transformer_attribution.png"))) == 2


def test_output_names_never_clash():
    from transexplain.visualize import output_stems

    names = output_stems([Path("a/img.png"), Path("b/img.png"), Path("c/img.jpg"), Path("x/a_img.png"),
                          Path("d/a/img.png"), Path("solo.png")])
    assert len(set(names)) == len(names) and names[-1] == "solo"


def test_explain_a_folder_explains_every_image_in_it(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("x.png", "y.jpg", "z.png"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tx("explain", folder, "--model", ckpt, "--method", "rollout", "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npy")) == ["x.rollout.npy", "y.rollout.npy", "z.rollout.npy"]
    assert out.stdout.count("predicted class") == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tx("explain", empty, "--model", ckpt, "--out", tmp_path / "out2")
    assert out.returncode == 2 and "holds no image files" in out.stderr


def test_grey_scale_images_are_converted_as_the_benchmarks_do_and_said(checkpoint, images, tmp_path):
    ckpt, _ = checkpoint
    d, _ = images
    out = tx("explain", d / "grey.png", "--model", ckpt, "--method", "rollout", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "grey-scale" in out.stdout and "converted to RGB" in out.stdout
    # the same RGB pixels the benchmarks' reader (data.imagenet.Preprocess: PIL's convert) starts from
    from transexplain.visualize import read_rgb_image

    ours = np.asarray(read_rgb_image(d / "grey.png"))
    grey = np.asarray(Image.open(d / "grey.png"))
    assert ours.shape == grey.shape + (3,)
    assert all(np.array_equal(ours[..., c], grey) for c in range(3))
