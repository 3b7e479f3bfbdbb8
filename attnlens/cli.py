"""The ``attnlens`` command line.

Each subcommand is a function ``_cmd_NAME(args)`` registered in :func:`build_parser`; long
runs show progress bars, tables are printed with ``rich``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["build_parser", "main"]

console = Console()


def _cmd_demo(args: argparse.Namespace) -> int:
    """Capture a tiny FLUX pipeline's attention over a short sampling run and summarise it."""
    import torch

    import attnlens
    from attnlens.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(num_layers=2, num_single_layers=2)
    pipe.set_progress_bar_config(desc="sampling", disable=False)
    console.print(f"[bold]attnlens {attnlens.__version__}[/] — capturing a tiny random-weight FLUX pipeline")
    with attnlens.capture(pipe, keep=("cross", "key_mass"), heads="mean") as cap:
        pipe(
            args.prompt,
            height=32,
            width=32,
            num_inference_steps=args.steps,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    ds = cap.result
    console.print(ds)
    _print_mass_table(ds)
    return 0


def _print_mass_table(ds) -> None:
    """Share of incoming attention per token kind, per layer (mean over samples, steps, heads)."""
    mass = ds.key_mass.mean(("step", "head"))  # (sample, layer, key)
    kinds = sorted(set(ds.key_kind.values.ravel()))
    table = Table(title="share of incoming attention by token kind (mean over steps and heads)")
    table.add_column("layer")
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("top text token", justify="left")
    text = ds.key_kind.values[0] != "image"
    for layer in ds.layer.values:
        per_key = mass.sel(layer=layer).mean("sample").values
        shares = [per_key[ds.key_kind.values[0] == k].sum() / per_key.sum() for k in kinds]
        top = int(per_key[text].argmax())
        label = ds.token_str.values[0, top] or f"#{top}"
        table.add_row(
            str(layer), *(f"{s:.3f}" for s in shares), f"{label} ({per_key[top] * len(per_key):.2f}× uniform)"
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="capture attention from the embedded model and summarise it")
    demo.add_argument("--prompt", default="a red mug on the left of a wooden table")
    demo.add_argument("--steps", type=int, default=4, help="denoising steps")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnlens`` command."""
    from attnlens.errors import AttnlensError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnlensError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
