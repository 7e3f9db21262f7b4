"""How many input rows one autograd graph may hold: the measured bytes a row adds to a forward's
saved tensors, and the budget they must stay under. One concept, used in two places: `api.explain`
splits a batch into calls of that many rows (every method is batch-invariant, so the maps do not
change), and the Captum methods size their gradient passes with it (`internal_batch_size="auto"`).
"""
from __future__ import annotations

import torch

#: one graph's saved tensors (those that grow with the rows) are kept under this many bytes on a
#: CPU; on a GPU under a quarter of its memory
CPU_GRAPH_BUDGET = 1 << 30
_ROW_BYTES: dict = {}  # (model, row shape, dtype, device, backward rules, what) -> graph bytes per row


def graph_budget(device) -> int:
    """The bytes one graph may save on `device` (see CPU_GRAPH_BUDGET)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return CPU_GRAPH_BUDGET


def repeat_first_row(value, rows: int, *, leaf: bool = True):
    """`value`'s first row `rows` times over: the input of a probe of what one more row costs
    (`saved_bytes`'s `rows_input`). By kind of `value`:

    - a tensor of one or more dims: its row 0 expanded to `rows` rows. With `leaf` (the input a
      backward starts from) a fresh tensor, detached from `value`'s graph, with its own storage,
      requiring grad when floating; without it a view of `value` (as the extra forward arguments
      Captum repeats along with its inputs were probed);
    - a batch that is no tensor but has `.repeat(n)` and slicing (a `TextBatch`): `value[:1].repeat(rows)`;
    - a tuple or a list: each item so, in a tuple or a list again;
    - anything else (None, a number, a 0-dim tensor: no batch to repeat): `value` itself, as
      Captum passes such extra forward arguments as they are.
    """
    if torch.is_tensor(value):
        if value.dim() == 0:
            return value
        if not leaf:
            return value[:1].expand(rows, *value.shape[1:])
        first = value[:1].detach()
        return first.expand(rows, *first.shape[1:]).clone().requires_grad_(first.is_floating_point())
    if isinstance(value, (tuple, list)):
        items = [repeat_first_row(v, rows, leaf=leaf) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple too
    if hasattr(value, "repeat") and hasattr(value, "__getitem__"):
        return value[:1].repeat(rows)
    return value


def saved_bytes(forward, rows_input, rows: int) -> int:
    """Bytes of the distinct storages `forward(rows_input(rows))` saves for its backward
    (`rows_input(r)`: r copies of one input row)."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(rows_input(rows))
    del out
    return sum(storages.values())


def graph_bytes_per_row(key: tuple, forward, rows_input) -> int:
    """What one more input row adds to a forward's saved tensors: the forward of 2 rows minus that of
    1, measured once per `key` (the model, row shape, dtype, device, backward rules). The difference
    leaves out what every row shares (the weights the linear layers save)."""
    from ..lrp.core import active_rules

    key = (*key, repr(active_rules()))
    if key not in _ROW_BYTES:
        if len(_ROW_BYTES) > 256:
            _ROW_BYTES.clear()
        _ROW_BYTES[key] = max(saved_bytes(forward, rows_input, 2) - saved_bytes(forward, rows_input, 1), 1)
    return _ROW_BYTES[key]


def rows_within_budget(per_row: int, device) -> int:
    """As many rows as keep a graph of `per_row` bytes a row under the device's budget (at least 1)."""
    return max(1, graph_budget(device) // per_row)
