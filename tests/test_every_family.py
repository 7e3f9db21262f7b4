"""Every model family from the CLI: a tiny random instance of each family in `models.families.FAMILIES`
(iterated, so a family added there is covered here without a new test) is saved where `--model`
loads it (`families.save_cli_instance`), and the commands run on it:

* vision: `tx-bench explain IMAGE` (AttnLRP: the whole recorded forward, back to the pixels) and
  `tx-bench perturb --limit 20` (saliency: gradients to the pixels) on a 16x16 image folder with
  one sub-folder per model class; the results file holds 20 records per test;
* text: `tx-bench explain --text` (AttnLRP) and `tx-bench eraser --limit 2` (saliency) on the
  embedded reviews.

The commands run in this process through the CLI's entry point (`transexplain.cli.main`, argv as
typed, exit code as the shell would see it), so the imports are paid once: a subprocess per
command would cost more than the whole run.
"""
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transexplain.models.families import FAMILIES, save_cli_instance  # noqa: E402

IMAGES_PER_CLASS = 7  # 3 classes x 7 >= 20


def tx(capsys, *args) -> int:
    """Run `tx-bench ARGS` in this process; the exit code (stderr is shown when it is not 0)."""
    from transexplain.cli import main

    argv = sys.argv
    sys.argv = ["tx-bench", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    code = exit_.value.code or 0
    if code:
        print(out, err)
    return code


def explain_method(family: str) -> str:
    """AttnLRP (the whole recorded forward, back to the pixels) where the family offers it, else rollout."""
    from transexplain.explainers.base import refusal
    from transexplain.models import as_adapter

    return "attnlrp" if refusal("attnlrp", as_adapter(FAMILIES[family][1]().eval())) is None else "rollout"


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """{number of classes: a folder of 16x16 PNGs, one sub-folder per class}, made on first use."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    made = {}

    def get(n_classes):
        if n_classes not in made:
            rng = np.random.default_rng(n_classes)
            for c in range(n_classes):
                folder = root / f"n{n_classes}" / f"c{c}"
                folder.mkdir(parents=True)
                for i in range(max(IMAGES_PER_CLASS, -(-20 // n_classes))):
                    Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
            made[n_classes] = root / f"n{n_classes}"
        return made[n_classes]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_from_the_cli(family, tmp_path, image_folders, capsys):
    from transexplain.results.store import ResultStore

    inst = save_cli_instance(family, tmp_path / "model")
    if inst.kind == "text":
        text = "the plot is thin but the acting is wonderful ."
        assert tx(capsys, "explain", "--text", text, *inst.args, "--method", explain_method(family)) == 0
        out = tmp_path / "eraser.h5"
        assert tx(capsys, "eraser", *inst.args, "--method", "saliency", "--limit", 2, "--out", out, "--quiet") == 0
        store = ResultStore(out)
        assert store.is_complete and store.done("saliency") == 2
        return
    data = image_folders(inst.num_classes)
    image = next((data / "c0").glob("*.png"))
    method = explain_method(family)
    assert tx(capsys, "explain", image, *inst.args, "--method", method, "--out", tmp_path / "maps") == 0
    assert list((tmp_path / "maps").glob("*.npy"))
    out = tmp_path / "perturb.h5"
    assert tx(capsys, "perturb", *inst.args, "--data", data, "--method", "saliency", "--limit", 20,
              "--batch-size", 10, "--num-workers", 0, "--out", out, "--quiet") == 0
    store = ResultStore(out)
    assert store.is_complete and store.done("clean") == 20
    for group in ("saliency/pred/positive", "saliency/pred/negative"):
        assert store.done(group) == 20, group
