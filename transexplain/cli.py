"""`tx-bench`: the command-line tool. Thin: parse, build a config, call the library, print."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

app = typer.Typer(
    name="tx-bench",
    help="Explain Transformer classifiers (ViT, DeiT, Swin, BERT) and benchmark the explanations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}

#: modules under transexplain/commands that add sub-commands with a `register(app)` function
COMMAND_MODULES = ("data", "vision", "text")


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    STATE["debug"] = debug


@app.command("methods")
def methods_cmd():
    """List every explanation method with a one-line description."""
    from .explainers import list_methods

    for name, text in list_methods().items():
        typer.echo(f"{name:24s} {text}")


@app.command("explain")
def explain_cmd(
    images: List[Path] = typer.Argument(None, help="Image files (PNG, JPEG, ...) to explain."),
    model: str = typer.Option("embedded", "--model", "-m", help="'embedded', a timm model name, or a checkpoint (.safetensors or its directory)."),
    method: str = typer.Option("transformer_attribution", "--method", help="Method name (see `tx-bench methods`)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="'all' (or a comma list): write one comparison grid of these methods side by side."),
    target: Optional[int] = typer.Option(None, "--target", help="Class index to explain (default: the predicted class)."),
    out: Path = typer.Option(Path("explanations"), "--out", "-o", help="Output directory for PNGs and .npy raw maps."),
    text: Optional[str] = typer.Option(None, "--text", help="Explain a text with a text classifier instead of images."),
    html: Optional[Path] = typer.Option(None, "--html", help="With --text: also write the coloured words as an HTML page."),
    crop: bool = typer.Option(False, "--crop", help="Resize + center-crop instead of the paper's plain resize."),
    pretrained: bool = typer.Option(False, "--pretrained", help="With a timm model name: load its pretrained weights from the local cache."),
):
    """Explain images (or a text): heatmap PNG + raw .npy per image, and the predicted class."""
    if text is not None:
        from .commands.text import explain_text

        explain_text(text=text, model=model, method=method, target=target, html=html)
        return
    if not images:
        raise UserError("Give at least one image file to explain (or --text \"...\" for a text model).")
    from .visualize import explain_images

    explain_images(images, model_spec=model, method=method, methods=methods, target=target, out=out, crop=crop,
                   pretrained=pretrained)


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


def main():
    """Entry point: user errors become one sentence and exit code 2 (a traceback with --debug)."""
    debug = "--debug" in sys.argv or os.environ.get("TX_BENCH_DEBUG") == "1"
    try:
        app(standalone_mode=False)
    except UserError as err:
        if debug:
            raise
        typer.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except (typer.Exit,) as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if debug:
            raise
        typer.echo(f"Error: {type(err).__name__}: {err} (run again with --debug for the traceback).", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
