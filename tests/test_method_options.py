"""`--option KEY=VALUE` / `METHOD.KEY=VALUE`: one parser for every command (commands.common.method_options),
refused in one sentence before any work, recorded in the run's settings, and applied to the maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transexplain.errors import UserError
from transexplain.commands.common import method_options

from test_vision_cli import fixtures, make_checkpoint, make_gtsegs, make_image_folder, run  # noqa: F401 (fixtures)


def test_a_plain_key_goes_to_every_chosen_method_that_has_it():
    got = method_options(["start_layer=0", "saliency.libragrad=true", "steps=5"],
                         ["rollout", "transformer_attribution", "saliency", "integrated_gradients"])
    assert got == {"rollout": {"start_layer": 0}, "transformer_attribution": {"start_layer": 0},
                   "saliency": {"libragrad": True}, "integrated_gradients": {"steps": 5}}
    assert method_options(None, ["rollout"]) == {}


@pytest.mark.parametrize("pairs,methods,words", [
    (["junk"], ["rollout"], "is not KEY=VALUE"),
    (["=3"], ["rollout"], "is not KEY=VALUE"),
    (["steps=3"], ["rollout", "saliency"], "none of the chosen methods"),
    (["rollout.steps=3"], ["rollout"], "has no option steps"),
    (["saliency.libragrad=true"], ["rollout"], "is not among the chosen methods"),
    (["saliency.libragrad=yes"], ["saliency"], "must be true or false"),
    (["integrated_gradients.steps=2.5"], ["integrated_gradients"], "must be a whole number"),
])
def test_bad_options_are_refused_in_one_sentence(pairs, methods, words):
    with pytest.raises(UserError) as err:
        method_options(pairs, methods)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_segment_applies_the_option_and_records_it(fixtures, tmp_path, run):  # noqa: F811
    """The maps a run stores (--save-maps) with --option start_layer=0 are the maps `explain` gives with
    start_layer=0, and not the default's; the settings record the option, so resuming without it is refused."""
    from transexplain import explain
    from transexplain.data.imagenet import Preprocess
    from transexplain.evaluation.segmentation import SegmentationData
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore

    out = tmp_path / "seg.h5"
    args = ["segment", "--method", "rollout", "--data", fixtures["seg"], "--model", fixtures["ckpt"], "--limit", 3,
            "--batch-size", 3, "--save-maps", "--quiet", "--num-workers", 0, "--out", out]
    done = run(*args, "--option", "start_layer=0")
    assert done.returncode == 0, done.stderr
    store = ResultStore(out)
    assert store.config["method_options"] == {"rollout": {"start_layer": 0}}
    saved = store.read("rollout", "map").astype(np.float64)
    loaded = load_model(str(fixtures["ckpt"]))
    data = SegmentationData(fixtures["seg"], Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std))
    x = torch.stack([data.load(i)[0] for i in range(3)]).to(torch.float64)
    for start, same in ((0, True), (None, False)):
        kw = {} if start is None else {"start_layer": start}
        want = explain(loaded.model, x, method="rollout", **kw).heatmap.numpy().astype(np.float16).astype(np.float64)
        assert np.array_equal(saved, want) == same
    again = run(*args)  # the same file without the option: other settings
    assert again.returncode == 2 and "--overwrite" in again.stderr
