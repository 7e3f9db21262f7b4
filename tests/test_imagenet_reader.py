"""ImageNet-style readers: class folders, flat folder + labels file, preprocessing, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from transexplain.data.imagenet import ImageFolderDataset, Preprocess
from transexplain.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_class_folders_sorted_names_give_indices_and_limit_prefix_is_balanced(tmp_path):
    for synset in ("n02", "n01", "n03"):  # created out of order on purpose
        for i in range(3):
            _save(tmp_path / synset / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    ds = ImageFolderDataset(tmp_path, Preprocess((8, 8), MEAN, STD), num_classes=3)
    assert ds.classes == ["n01", "n02", "n03"]
    # interleaved: the first three items cover the three classes
    assert [ds.label(i) for i in range(3)] == [0, 1, 2]
    assert ds.name(0) == "n01/0.png" and len(ds) == 9


def test_model_class_names_decide_the_order_when_they_match(tmp_path):
    for name in ("cat", "ant", "bee"):
        _save(tmp_path / name / "0.png", np.zeros((4, 4, 3), np.uint8))
    ds = ImageFolderDataset(tmp_path, Preprocess((4, 4), MEAN, STD), num_classes=3, class_names=["cat", "bee", "ant"])
    assert {ds.name(i).split("/")[0]: ds.label(i) for i in range(3)} == {"cat": 0, "bee": 1, "ant": 2}


def test_flat_folder_with_labels_file(tmp_path):
    for i in range(3):
        _save(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG".replace("JPEG", "png"), np.full((5, 6, 3), i * 50, np.uint8))
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000000.png 7\nILSVRC2012_val_00000001.png 0\n\nILSVRC2012_val_00000002.png 999\n")
    ds = ImageFolderDataset(tmp_path, Preprocess((4, 4), MEAN, STD), labels_file=labels, num_classes=1000)
    assert [ds.label(i) for i in range(3)] == [7, 0, 999]
    with pytest.raises(UserError, match="go up to 999 but the model has only 10 classes"):
        ImageFolderDataset(tmp_path, Preprocess((4, 4), MEAN, STD), labels_file=labels, num_classes=10)
    labels.write_text("a.png seven\n")
    with pytest.raises(UserError, match="Line 1 of .* is not `filename label`"):
        ImageFolderDataset(tmp_path, Preprocess((4, 4), MEAN, STD), labels_file=labels)


def test_resize_without_crop_and_normalisation(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    _save(tmp_path / "a" / "x.png", img)
    pre = Preprocess((10, 10), MEAN, STD)
    x = ImageFolderDataset(tmp_path, pre).load(0)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    black = -torch.tensor(MEAN) / torch.tensor(STD)
    assert torch.allclose(x[:, 5, 0], white, atol=1e-5) and torch.allclose(x[:, 5, 9], black, atol=1e-5)
    assert torch.allclose(pre.fill.view(3), black)


def test_crop_resizes_by_256_over_224_then_center_crops():
    pre = Preprocess((224, 224), MEAN, STD, crop=True)
    img = Image.fromarray(np.zeros((300, 600, 3), np.uint8))
    arr = pre.pil_to_array(img)
    assert arr.shape == (224, 224, 3)
    # the shorter side becomes int(224*256/224) = 256 before the crop: a 2:1 image keeps its aspect
    marked = np.zeros((300, 600, 3), np.uint8)
    marked[:, 295:305] = 255  # a vertical stripe in the middle survives the center crop
    assert pre.pil_to_array(Image.fromarray(marked))[:, 112].mean() > 100


def test_undecodable_image_loads_as_none(tmp_path):
    _save(tmp_path / "a" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolderDataset(tmp_path, Preprocess((4, 4), MEAN, STD))
    loaded = {ds.name(i): ds.load(i) for i in range(len(ds))}
    assert loaded["a/broken.png"] is None and loaded["a/ok.png"] is not None


def test_grey_and_rgba_images_become_rgb(tmp_path):
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((6, 6, 4), np.uint8)).save(tmp_path / "r.png")
    labels = tmp_path / "l.txt"
    labels.write_text("g.png 0\nr.png 1\n")
    ds = ImageFolderDataset(tmp_path, Preprocess((4, 4), MEAN, STD), labels_file=labels)
    assert ds.load(0).shape == (3, 4, 4) and ds.load(1).shape == (3, 4, 4)
    assert ds.converted == {0, 1}  # the perturb command says how many were converted


def test_the_perturb_command_says_how_many_images_were_converted(tmp_path):
    from test_vision_cli import make_checkpoint, make_image_folder, tx

    imgs = make_image_folder(tmp_path / "imgs")
    first = sorted(p for p in imgs.rglob("*.png"))[0]
    rgb = np.asarray(Image.open(first).convert("RGB"))
    Image.fromarray(rgb[..., 0]).save(first)  # one grey-scale image among RGB ones
    r = tx("perturb", "--method", "rollout", "--data", imgs, "--model", make_checkpoint(tmp_path / "ckpt"),
           "--out", tmp_path / "p.h5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Converted to RGB, as `tx-bench explain` does: 1 image (it was grey-scale" in r.stdout


def test_bad_paths_are_one_sentence(tmp_path):
    pre = Preprocess((4, 4), MEAN, STD)
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", pre)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "file.txt", pre)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="No images found"):
        ImageFolderDataset(empty, pre)
    flat = tmp_path / "flat"
    _save(flat / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="no class sub-folders: give a labels file"):
        ImageFolderDataset(flat, pre)
    with pytest.raises(UserError, match="labels file .* does not exist"):
        ImageFolderDataset(flat, pre, labels_file=tmp_path / "nope.txt")


def test_data_make_imagenet_like_writes_a_folder_the_reader_takes(tmp_path):
    """`tx-bench data make --imagenet-like N`: 1000 class folders, photo-sized JPEGs, readable as
    ImageNet (class k % 1000); a second make replaces it, a foreign folder is refused."""
    from test_vision_cli import tx

    out = tmp_path / "inet"
    r = tx("data", "make", "--imagenet-like", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Wrote 3 ImageNet-like JPEGs" in r.stdout
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 1000
    files = sorted(out.glob("*/*.JPEG"))
    assert [f.parent.name for f in files] == ["n00000000", "n00000001", "n00000002"]
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and min(img.size) >= 333
    ds = ImageFolderDataset(out, Preprocess((16, 16), (0.5,) * 3, (0.5,) * 3), num_classes=1000)
    assert len(ds) == 3 and [ds.label(i) for i in range(3)] == [0, 1, 2]
    assert tx("data", "make", "--imagenet-like", 2, "--out", out).returncode == 0
    assert len(list(out.glob("*/*.JPEG"))) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    refused = tx("data", "make", "--imagenet-like", 2, "--out", foreign)
    assert refused.returncode == 2 and "is not an --imagenet-like folder" in refused.stderr
    assert (foreign / "keep.txt").read_text() == "mine"
