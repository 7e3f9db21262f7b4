"""`tx-bench`: the command-line tool. Thin: parse, build a config, call the library, print."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError
from .commands.common import (DEFAULT_PROMPT, Classes, MethodOptions, Precision, Prompt, RandomWeights,
                              split_classes)

app = typer.Typer(
    name="tx-bench",
    help="Explain Transformer classifiers (ViT, DeiT, Swin, BERT) and benchmark the explanations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: flags are shown as flags (rich's panels print `<bool>` after each of them)
    rich_markup_mode=None,
)
STATE = {"debug": False}

#: modules under transexplain/commands that add sub-commands with a `register(app)` function
COMMAND_MODULES = ("data", "vision", "text", "evaluate")


def _show_version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"tx-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
):
    STATE["debug"] = debug


@app.command("methods")
def methods_cmd(
    models: bool = typer.Option(False, "--models", help="Print the model family x method matrix instead (markdown, as in docs/models.md)."),
):
    """List every explanation method: its name, the other names it answers to, and what it does."""
    if models:
        from .models.families import matrix_markdown

        typer.echo(matrix_markdown(), nl=False)
        return
    from .explainers import get_method, list_methods
    from .explainers.base import support_matrix

    for name, text in list_methods().items():
        aliases = get_method(name).aliases
        also = f" (also: {', '.join(aliases)})" if aliases else ""
        typer.echo(f"{name:24s} {text}{also}")
    matrix = support_matrix()
    families = list(next(iter(matrix.values())))
    typer.echo("")
    typer.echo("Where each method runs (from what it needs and what each architecture's adapter offers):")
    typer.echo(f"{'method':24s} " + " ".join(f"{f:6s}" for f in families))
    for name, row in matrix.items():
        typer.echo(f"{name:24s} " + " ".join(f"{'yes' if row[f] is None else 'no':6s}" for f in families))
    for name, row in matrix.items():
        for reason in filter(None, row.values()):
            typer.echo(f"  {reason}")


@app.command("explain")
def explain_cmd(
    images: List[Path] = typer.Argument(None, help="Image files (PNG, JPEG, ...) or folders of them to explain; outputs never overwrite each other (clashing names get their folder's name in front)."),
    model: str = typer.Option("embedded", "--model", "-m", help="'embedded', a timm name, a checkpoint (.safetensors or its directory), hf:NAME_OR_FOLDER, torchvision:NAME, clip:NAME_OR_FOLDER or open_clip:ARCH:WEIGHTS_FILE / open_clip:FOLDER (see docs/models.md)."),
    method: str = typer.Option("transformer_attribution", "--method", help="Method name (see `tx-bench methods`)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="'all' (or a comma list): write one comparison grid of these methods side by side."),
    target: Optional[int] = typer.Option(None, "--target", help="Class index to explain (default: the predicted class)."),
    out: Path = typer.Option(Path("explanations"), "--out", "-o", help="Output directory for PNGs and .npy raw maps."),
    text: Optional[str] = typer.Option(None, "--text", help="Explain a text with a text classifier instead of images."),
    html: Optional[Path] = typer.Option(None, "--html", help="With --text: also write the coloured words as an HTML page."),
    crop: bool = typer.Option(False, "--crop", help="Resize + center-crop instead of the paper's plain resize."),
    random_weights: RandomWeights = False,
    precision: Precision = "float64",
    classes: Classes = None,
    prompt: Prompt = DEFAULT_PROMPT,
    option: MethodOptions = None,
):
    """Explain images (or a text): heatmap PNG + raw .npy per image, and the predicted class.

    Grey-scale images are converted to RGB (and said), as the benchmarks do; images with an alpha
    channel are refused.
    """
    from .precision import check_precision

    precision = check_precision(precision)
    if text is not None:
        from .commands.text import explain_text

        explain_text(text=text, model=model, method=method, target=target, html=html, precision=precision,
                     options=option)
        return
    if not images:
        raise UserError("Give at least one image file or folder to explain (or --text \"...\" for a text model).")
    from .visualize import explain_images

    explain_images(images, model_spec=model, method=method, methods=methods, target=target, out=out, crop=crop,
                   pretrained=not random_weights, precision=precision, classes=split_classes(classes),
                   prompt=prompt, options=option)


def _register_commands():
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as err:
            if err.name == f"{__package__}.commands.{name}":
                continue
            raise
        module.register(app)


_register_commands()


def _signal_classes():
    """(usage-error classes, exit classes, abort classes) of the click this typer runs on.

    typer >= 0.2x vendors its own click (`typer._click`, with `typer.Exit`/`typer.Abort`) and
    raises none of click's classes; older typer raises click's. Both are caught.
    """
    usage, exits, aborts = [], [typer.Exit], [typer.Abort]
    try:
        from typer._click import exceptions as vendored

        usage.append(vendored.ClickException)
    except ImportError:
        pass
    try:
        import click

        usage.append(click.exceptions.ClickException)
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(exits), tuple(aborts)


def _interrupted():
    from .interrupt import message

    typer.echo(f"\n{message()}", err=True)
    sys.exit(130)


def main():
    """Entry point; the exit codes are the CLI's contract:

    0 done; 1 an unexpected error (one line, the traceback with --debug); 2 a usage error (unknown
    command or option, missing or bad value: the usage line, the option's name, click's wording),
    a user error (one sentence saying what to do), or no arguments at all (the help is printed,
    as click does); 130 interrupted by Ctrl-C ("Interrupted after N of M images; ...").
    Under `standalone_mode=False` typer returns the exit code of `typer.Exit` (and of a Ctrl-C, as
    130) instead of raising it, and raises usage errors as its own click's classes.
    """
    from . import interrupt

    debug = "--debug" in sys.argv or os.environ.get("TX_BENCH_DEBUG") == "1"
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun only rank 0 prints (errors still do)
        sys.stdout = open(os.devnull, "w")
    usage_errors, exits, aborts = _signal_classes()
    interrupt.reset()
    try:
        rv = app(standalone_mode=False)
    except KeyboardInterrupt:
        _interrupted()
    except UserError as err:
        if debug:
            raise
        if not getattr(err, "silent", False):  # under torchrun, an error all ranks share is printed by rank 0
            typer.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except exits as err:
        rv = err.exit_code
    except aborts:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except usage_errors as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            # the help is the message (plain click) or was already printed (typer with rich)
            text = err.format_message()
            if text.strip():
                typer.echo(text)
        else:
            err.show()
        sys.exit(err.exit_code)
    except Exception as err:
        if debug:
            raise
        typer.echo(f"Error: {type(err).__name__}: {err} (run again with --debug for the traceback).", err=True)
        sys.exit(1)
    code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    if code == 130:
        _interrupted()
    sys.exit(code)


if __name__ == "__main__":
    main()
