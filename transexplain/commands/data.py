"""`tx-bench data ...`: the embedded procedural data set."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

data_app = typer.Typer(help="The embedded default data set (procedural shapes).", no_args_is_help=True,
                       rich_markup_mode=None)


@data_app.command("make")
def make_cmd(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory to write to (default: the cache the benchmarks read)."),
    n: int = typer.Option(300, "--n", help="Validation images (image folder val/<class>/<id>.png)."),
    n_seg: Optional[int] = typer.Option(None, "--n-seg", help="Segmentation images (.mat); default 2/3 of --n."),
    n_two: Optional[int] = typer.Option(None, "--n-two", help="Two-object images (.mat); default 1/3 of --n."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    imagenet_like: Optional[int] = typer.Option(None, "--imagenet-like", min=1, help="Instead: write N synthetic ImageNet-shaped JPEGs into --out (1000 class folders, photo sizes), to measure throughput without ImageNet."),
):
    """Generate the shapes data set: an image folder, a gtsegs-format .mat file and a two-object .mat file.

    With --imagenet-like N: a synthetic ImageNet-shaped image folder instead (for `scripts/bench_scale.py`).
    """
    import shutil
    import tempfile
    import time

    from ..data import shapes

    if imagenet_like is not None:
        make_imagenet_like(imagenet_like, out, seed)
        return

    if n < 0 or (n_seg is not None and n_seg < 0) or (n_two is not None and n_two < 0):
        raise UserError("Sizes must be zero or positive.")
    n_seg = n * 2 // 3 if n_seg is None else n_seg
    n_two = n // 3 if n_two is None else n_two
    t0 = time.time()
    if out is None:
        is_default = (n, n_seg, n_two, seed) == (300, 200, 100, 0)
        if not is_default:
            raise UserError("Non-default sizes or seed need --out DIR: the cache holds only the default set.")
        target = shapes.cache_root() / f"{shapes.VERSION}-seed0"
        if target.exists():
            shutil.rmtree(target)
        root = shapes.embedded_data_dir()
    else:
        if out.exists() and any(out.iterdir()):
            if not (out / shapes.MARKER).exists():
                raise UserError(f"{out} exists and is not a shapes data set: give an empty or new directory.")
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".shapes-tmp-", dir=out.parent))
        try:
            shapes.generate(tmp, n_val=n, n_seg=n_seg, n_two=n_two, seed=seed)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        root = out
    paths = shapes.paths_in(root)
    typer.echo(f"Wrote {n} validation images to {paths['val']}")
    typer.echo(f"Wrote {n_seg} segmentation images to {paths['seg']}")
    typer.echo(f"Wrote {n_two} two-object images to {paths['two']} ({time.time() - t0:.1f} s)")


def make_imagenet_like(n: int, out: Optional[Path], seed: int):
    """Write the synthetic ImageNet-shaped folder into `out` (built beside it, then renamed into place)."""
    import shutil
    import tempfile
    import time

    from ..data.imagenet import IMAGENET_LIKE_MARKER, write_imagenet_like
    from ..data.loader import available_cpus

    if out is None:
        raise UserError("--imagenet-like needs --out DIR: say where to write the images.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / IMAGENET_LIKE_MARKER).exists():
            raise UserError(f"{out} exists and is not an --imagenet-like folder: give an empty or new directory.")
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".imagenet-like-tmp-", dir=out.parent))
    try:
        from tqdm import tqdm
        import sys

        with tqdm(total=n, unit="img", desc="imagenet-like", disable=not sys.stderr.isatty()) as bar:
            size = write_imagenet_like(tmp, n, seed=seed, workers=available_cpus(), progress=bar.update)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    typer.echo(f"Wrote {n} ImageNet-like JPEGs ({size / max(1, n) / 1024:.0f} kB each on average) in 1000 class "
               f"folders to {out} ({time.time() - t0:.1f} s)")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
