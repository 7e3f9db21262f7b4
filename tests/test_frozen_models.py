"""A frozen model (no parameter requires grad, as for inference) gives every method the same map."""
import torch

import transexplain
from transexplain.models.text import TextAdapter

from conftest import make_vit
from test_text_adapter import padded_batch, tiny_bert


def test_every_method_on_a_frozen_vit_equals_the_trainable_one():
    model = make_vit()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = {m: transexplain.explain(model, x, m).token_map for m in transexplain.list_methods()}
    model.requires_grad_(False)
    for method, ref in want.items():
        got = transexplain.explain(model, x, method).token_map
        assert torch.equal(got, ref), method


def test_a_frozen_text_model_equals_the_trainable_one():
    model = tiny_bert()
    ids, mask = padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask}
    methods = ["transformer_attribution", "gradcam", "saliency", "attnlrp", "attcat"]
    want = {m: transexplain.explain(TextAdapter(model), batch, m).token_map for m in methods}
    model.requires_grad_(False)
    for m in methods:
        assert torch.equal(transexplain.explain(TextAdapter(model), batch, m).token_map, want[m]), m
