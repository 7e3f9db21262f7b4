"""What every benchmark command shares: turning `--method` into the methods to run."""
from __future__ import annotations

from ..errors import UserError

CLASSES_HELP = "With --model clip:PATH or open_clip:...: the zero-shot classes, a comma list (e.g. the data's class folder names)."
PROMPT_HELP = "With --classes: the text each class name is written into ({} marks where)."


def split_classes(spec):
    """`--classes a,b,c` -> ['a', 'b', 'c'] (None when not given)."""
    return [c.strip() for c in spec.split(",") if c.strip()] if spec else None


def resolve_methods(spec: str, adapter=None) -> list:
    """`--method` -> canonical method names, the same for every command.

    'all' is every registered method that can run on `adapter`'s architecture (every registered
    method when no adapter is given yet); a name or comma list is checked name by name, and a
    method the architecture cannot run is refused before any work, with the reason.
    """
    from ..explainers import get_method, method_names
    from ..explainers.base import refusal

    if spec.strip() == "all":
        names = list(method_names())
        return names if adapter is None else [m for m in names if refusal(m, adapter) is None]
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise UserError("Give a method with --method (a name from `tx-bench methods`, or 'all').")
    names = list(dict.fromkeys(get_method(m).name for m in names))
    if adapter is not None:
        for m in names:
            reason = refusal(m, adapter)
            if reason:
                raise UserError(reason)
    return names
