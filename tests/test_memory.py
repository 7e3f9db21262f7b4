"""`explainers.memory.repeat_first_row`: the repeated-row input of the per-row memory probe, shared by
`api.rows_per_call` (a tensor or a TextBatch) and the Captum methods' `graph_bytes_per_row` (the
inputs, and the extra forward arguments)."""
from collections import namedtuple

import torch

from transexplain.explainers.memory import repeat_first_row
from transexplain.models.text import TextBatch


def test_a_tensor_becomes_a_fresh_leaf_of_its_first_row():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4).requires_grad_(True)
    y = x * 2  # a non-leaf: its repeat must not join its graph
    out = repeat_first_row(y, 3)
    assert out.shape == (3, 3, 4)
    torch.testing.assert_close(out, (2 * torch.arange(12, dtype=torch.float64)).reshape(1, 3, 4).expand(3, 3, 4))
    assert out.is_leaf and out.requires_grad and out.grad_fn is None
    assert out.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
    assert out.untyped_storage().nbytes() == 3 * 12 * 8  # its own storage: the rows, not a view of one
    assert out.is_contiguous()

    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = repeat_first_row(ids, 2)
    assert out.tolist() == [[5, 6, 7], [5, 6, 7]] and out.dtype == torch.int64
    assert not out.requires_grad  # an integer tensor carries no gradient

    assert repeat_first_row(x, 1).shape == (1, 3, 4)


def test_without_leaf_a_tensor_is_a_view_of_its_first_row():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = repeat_first_row(ids, 4, leaf=False)
    assert out.shape == (4, 3) and out.tolist() == [[5, 6, 7]] * 4
    assert out.stride() == (0, 1)  # expanded, not copied
    assert out.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()


def test_a_text_batch_repeats_its_first_sample():
    batch = TextBatch(torch.tensor([[101, 7, 102, 0], [101, 8, 9, 102]]),
                      torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                      torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]]),
                      torch.tensor([[1, 0, 1, 1], [1, 0, 0, 1]]),
                      [[None, 0, None, None], [None, 0, 1, None]])
    out = repeat_first_row(batch, 3)
    assert isinstance(out, TextBatch) and len(out) == 3 and out.shape == (3, 4)
    assert out.input_ids.tolist() == [[101, 7, 102, 0]] * 3
    assert out.attention_mask.tolist() == [[1, 1, 1, 0]] * 3
    assert out.token_type_ids.tolist() == [[0, 0, 0, 0]] * 3
    assert out.special_mask.tolist() == [[1, 0, 1, 1]] * 3
    assert out.word_ids == [[None, 0, None, None]] * 3
    no_types = repeat_first_row(TextBatch(batch.input_ids, batch.attention_mask), 2)
    assert no_types.token_type_ids is None and no_types.input_ids.tolist() == [[101, 7, 102, 0]] * 2


def test_a_tuple_repeats_its_batches_and_passes_its_extras_as_they_are():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = torch.tensor([[1, 0], [1, 1], [0, 1]])
    scale = torch.tensor(0.5)  # 0-dim: no batch (Captum passes it as is too)
    extras = {"mode": "sum"}
    out = repeat_first_row((x, mask, None, 7, scale, extras), 2)
    assert isinstance(out, tuple) and len(out) == 6
    assert out[0].tolist() == [[1.0, 2.0], [1.0, 2.0]] and out[0].requires_grad
    assert out[1].tolist() == [[1, 0], [1, 0]]
    assert out[2] is None and out[3] == 7 and out[4] is scale and out[5] is extras

    views = repeat_first_row((x, mask, "as is"), 3, leaf=False)
    assert [v.shape for v in views[:2]] == [(3, 2), (3, 2)] and views[2] == "as is"
    assert not views[0].requires_grad and views[1].stride() == (0, 1)

    as_list = repeat_first_row([mask, None], 2)
    assert isinstance(as_list, list) and as_list[0].tolist() == [[1, 0], [1, 0]] and as_list[1] is None
    Args = namedtuple("Args", "ids scale")
    named = repeat_first_row(Args(mask, 3), 2)
    assert isinstance(named, Args) and named.ids.shape == (2, 2) and named.scale == 3
