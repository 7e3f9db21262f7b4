"""What every benchmark command shares: its common options (declared once here) and turning
`--method` / `--option` into the methods to run and their settings."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import UserError
from ..precision import BENCHMARK_HELP as BENCHMARK_PRECISION_HELP
from ..precision import HELP as PRECISION_HELP

CLASSES_HELP = "With --model clip:PATH or open_clip:...: the zero-shot classes, a comma list (e.g. the data's class folder names)."
PROMPT_HELP = "With --classes: the text each class name is written into ({} marks where)."
OPTION_HELP = ("A method option KEY=VALUE (repeatable), e.g. libragrad=true or steps=50, for every chosen method that "
               "has it; METHOD.KEY=VALUE for one method. The options of `tx-bench methods` and docs/methods.md.")
NUM_WORKERS_HELP = ("Processes that decode and resize the images (0: in the main process); default: this process's "
                    "share of the CPU cores less one, at most 8. The results do not depend on it.")
#: the zero-shot prompt of `--prompt` when none is given
DEFAULT_PROMPT = "a photo of a {}"

# The options that several commands (perturb, segment, evaluate, eraser) declare alike: one declaration
# each, used as `name: Alias = default` (typer reads the flags and help from the Annotated type). An
# option whose help differs on purpose between commands is a factory taking the differing text.


def model_option(help: str = "'embedded', a timm model name, or a checkpoint."):
    """`--model/-m` with the command's own list of what it accepts."""
    return Annotated[str, typer.Option("--model", "-m", help=help)]


def limit_option(help: str = "Use only the first N images."):
    """`--limit` (at least 1) with what the command counts."""
    return Annotated[Optional[int], typer.Option("--limit", min=1, help=help)]


def out_option(command: str, note: str = ""):
    """`--out/-o`: the HDF5 results file, by default results/<command>_<method>.h5."""
    return Annotated[Optional[Path], typer.Option(
        "--out", "-o", help=f"HDF5 results file (default results/{command}_<method>.h5{note}).")]


Method = Annotated[str, typer.Option("--method", help="Method name (see `tx-bench methods`), a comma list, or 'all'.")]
Model = model_option()
Limit = limit_option()
Labels = Annotated[Optional[Path], typer.Option(
    "--labels", help="Labels file of `filename label` lines for a flat image folder.")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
#: float64 / mixed / float32 (explain, evaluate, eraser)
Precision = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
#: and bfloat16 / float16 under autocast (perturb, segment)
BenchmarkPrecision = Annotated[str, typer.Option("--precision", help=BENCHMARK_PRECISION_HELP)]
RandomWeights = Annotated[bool, typer.Option(
    "--random-weights",
    help="Use the architecture with seeded random weights instead of its pretrained or checkpoint weights.")]
Classes = Annotated[Optional[str], typer.Option("--classes", help=CLASSES_HELP)]
Prompt = Annotated[str, typer.Option("--prompt", help=PROMPT_HELP)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Start the results file over instead of resuming it.")]
SaveMaps = Annotated[bool, typer.Option(
    "--save-maps", help="Also store every heatmap (float16) in the results file; part of the run's settings "
                        "(a resume must give it the same way).")]
NumWorkers = Annotated[Optional[int], typer.Option("--num-workers", min=0, help=NUM_WORKERS_HELP)]
MethodOptions = Annotated[Optional[List[str]], typer.Option("--option", help=OPTION_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


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


def _parse_value(value: str):
    """true/false, integers and decimals as such, the rest as text."""
    value = value.strip()
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_options(pairs) -> list:
    """`--option` pairs -> [(method or None, key, value)]; a malformed pair is refused in one sentence."""
    parsed = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--option {pair!r} is not KEY=VALUE: write e.g. --option libragrad=true "
                            "(or METHOD.KEY=VALUE for one method).")
        method, dot, name = key.rpartition(".")
        parsed.append((method if dot else None, name, _parse_value(value)))
    return parsed


def method_options(pairs, methods) -> dict:
    """`--option` pairs -> {method: {key: value}} for the chosen `methods`, the same for every command.

    KEY=VALUE goes to every chosen method that has the option KEY; METHOD.KEY=VALUE to that method
    only. An option that no chosen method has, or a METHOD that is not chosen, is refused in one
    sentence before any work is done.
    """
    from ..explainers import get_method

    out = {}
    for method, key, value in parse_options(pairs):
        if method is not None:
            name = get_method(method).name
            if name not in methods:
                raise UserError(f"--option {method}.{key}: {name} is not among the chosen methods "
                                f"({', '.join(methods)}): add it to --method or drop the option.")
            targets = [name]
        else:
            targets = [m for m in methods if key in get_method(m).defaults()]
        for m in targets:
            defaults = get_method(m).defaults()
            if key not in defaults:
                raise UserError(f"Method {m!r} has no option {key}: its options are {', '.join(defaults) or 'none'}.")
            out.setdefault(m, {})[key] = value
        if not targets:
            raise UserError(f"--option {key}: none of the chosen methods ({', '.join(methods)}) has an option "
                            f"{key!r}: see `tx-bench methods` for each method's options.")
    for m, opts in out.items():
        get_method(m)(**opts)  # values of the wrong kind are refused here, before any work
    return out
