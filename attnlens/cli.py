"""The ``attnlens`` command line.

Each subcommand is a function ``_cmd_NAME(args)`` registered in :func:`build_parser`; long
runs show progress bars, tables are printed with ``rich``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["build_parser", "main"]

console = Console()


def _cmd_demo(args: argparse.Namespace) -> int:
    """Capture the embedded model into a store, find its sinks, segment by attention, write a report."""
    import attnlens
    from attnlens import demo, zoo

    _check(folders={"--out": args.out}, positive={"--scenes": args.scenes, "--steps": args.steps})
    if args.model not in zoo.available():
        from attnlens.errors import InputError, choices

        raise InputError(f"--model {args.model!r} is no embedded model; choose {choices(zoo.available())}")
    console.print(f"[bold]attnlens {attnlens.__version__}[/] — the embedded model {args.model!r}")
    result = demo.run(
        args.out, model=args.model, scenes=args.scenes, steps=args.steps, guidance=args.guidance
    )
    console.print(f"captured into {result.store}")
    _print_frame(
        result.token_mass, "share of incoming attention by token kind, and the text token with the largest r"
    )
    sinks = result.sinks[[c for c in ("layer", "gas", "gas_share", "top_kind") if c in result.sinks]]
    _print_frame(sinks, "global attention sinks per layer (token, share of (caption, step) pairs)")
    _print_frame(result.segmentation, "referring segmentation by attention (ShapesRef test scenes)")
    console.print(f"report written to {result.report}")
    return 0


def _print_frame(frame, title: str) -> None:
    cells = [
        [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)
    ]
    table = Table(title=title)
    for i, column in enumerate(frame.columns):
        # figures keep their full width on a narrow terminal; headers fold instead
        width = max((len(row[i]) for row in cells), default=1)
        justify = "right" if frame[column].dtype.kind in "fiu" else "left"
        table.add_column(str(column), justify=justify, overflow="fold", min_width=width)
    for row in cells:
        table.add_row(*row)
    console.print(table, crop=False)


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Print what a store holds: samples, variables and their sizes, layers, steps and tokens."""
    from attnlens.errors import CorruptStoreError, SelectionError, choices
    from attnlens.store import open_store, verify_store
    from attnlens.store.planning import format_bytes

    try:
        ds = open_store(args.store)
    except CorruptStoreError as exc:
        if not args.verify:
            raise
        console.print(f"[red]damaged:[/] {exc}")
        return _verify(args.store, verify_store, "the store")
    ids = [str(i) for i in ds.sample_id.values]
    if args.sample is not None and args.sample not in ids:
        raise SelectionError(
            f"--sample {args.sample!r} is not a sample of {args.store}; ids: {choices(ids) or 'none'}"
        )
    disk = ds.encoding["stored_bytes"]
    attrs = ds.attrs
    console.print(f"[bold]{args.store}[/] — attnlens store, schema version {attrs.get('schema_version')}")
    model = attrs.get("model_id") or attrs.get("model_class", "?")
    console.print(f"model: {model} ({attrs.get('family', '?')}, config hash {attrs.get('config_hash', '?')})")
    versions = attrs.get("versions", {})
    if versions:
        console.print("written by: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    slots = ds.encoding.get("sample_slots", len(ids))
    console.print(f"samples: {len(ids)} complete of {slots} slot(s): {choices(ids, 8) or '—'}")
    if ds.encoding.get("in_progress"):
        console.print(f"being written (or left by a crash): slot(s) {choices(ds.encoding['in_progress'], 8)}")
    for where, problem in ds.encoding.get("damaged", {}).items():
        console.print(f"[red]damaged:[/] sample {where}: {problem}")

    table = Table(title="variables")
    for column in ("variable", "dims", "shape", "dtype", "in memory", "on disk", "ratio"):
        table.add_column(
            column,
            justify="right" if column in ("in memory", "on disk", "ratio") else "left",
            no_wrap=column == "variable",
        )
    for name, var in ds.data_vars.items():
        stored = disk.get(str(name), 0)
        table.add_row(
            str(name),
            ", ".join(var.dims),
            str(var.shape),
            str(var.dtype),
            format_bytes(var.nbytes),
            format_bytes(stored),
            f"{var.nbytes / stored:.2f}×" if stored else "—",
        )
    console.print(table)
    console.print(f"on disk in all (chunks): {format_bytes(sum(disk.values()))}")

    kinds = [str(k) for k in ds.layer_kind.values]
    names = [str(n) for n in ds.layer.values]
    for kind in dict.fromkeys(kinds):
        chosen = [n for n, k in zip(names, kinds, strict=True) if k == kind]
        console.print(f"layers ({kind}, {len(chosen)}): {choices(chosen, 8)}")

    steps = Table(title="steps")
    for column in ("step", "denoise step", "timestep", "branch"):
        steps.add_column(column)
    for row in zip(
        *(ds[c].values.tolist() for c in ("step", "denoise_step", "timestep", "branch")), strict=True
    ):
        steps.add_row(str(row[0]), str(row[1]), f"{row[2]:g}", str(row[3]))
    console.print(steps)

    if ids:
        sample = args.sample if args.sample is not None else ids[0]
        tokens = ds.attnlens.tokens(sample=sample)
        pads = tokens.token_kind == "pad"
        title = f"text tokens of sample {sample!r}" + (
            f" ({int(pads.sum())} pad tokens not shown)" if pads.any() else ""
        )
        table = Table(title=title)
        for column in ("position", "token", "word", "word index", "kind"):
            table.add_column(column)
        for position, row in tokens[~pads].iterrows():
            table.add_row(str(position), row.token_str, row.word, str(row.word_index), row.token_kind)
        console.print(table)
        console.print(f"image tokens: {ds.sizes['query']} on a grid of {_grid(ds, np)} (frame, y, x)")

    if args.verify:
        return _verify(args.store, verify_store, f"{len(ids)} sample(s)")
    return 0


def _verify(store: str, verify_store, what: str) -> int:
    """Print what :func:`~attnlens.store.verify_store` finds; exit status 1 if anything is damaged."""
    problems = verify_store(store)
    for problem in problems:
        console.print(f"[red]damaged:[/] {problem}")
    console.print(f"verified {what}: {len(problems)} problem(s)")
    return 1 if problems else 0


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keep``, ``--heads``, ``--layers`` and ``--capture-dtype``, read by :func:`_spec_fields`."""
    parser.add_argument(
        "--keep",
        nargs="+",
        default=["cross"],
        help="variables: cross text_to_image key_mass hidden_norm full",
    )
    parser.add_argument("--heads", default="all", help="all, mean, max, or head indices such as 0,3")
    parser.add_argument(
        "--layers", nargs="+", help="layer names or globs, e.g. 'single.*' (default: every layer)"
    )
    parser.add_argument("--capture-dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _spec_fields(args: argparse.Namespace) -> dict:
    """The CaptureSpec fields of ``--keep``, ``--heads``, ``--layers`` and ``--capture-dtype``."""
    import torch

    from attnlens.errors import InputError

    try:
        heads = (
            args.heads if args.heads in ("all", "mean", "max") else [int(h) for h in args.heads.split(",")]
        )
    except ValueError:
        raise InputError(
            f"--heads {args.heads!r}: give all, mean, max, or head indices such as 0,3"
        ) from None
    spec = {"keep": tuple(args.keep), "heads": heads, "dtype": getattr(torch, args.capture_dtype)}
    if args.layers:
        spec["layers"] = args.layers
    return spec


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the bytes a capture will write to a store, per variable, per sample and per run."""
    from attnlens.store import plan

    spec = _spec_fields(args)
    with console.status(f"reading {args.model}"):
        result = plan(
            args.model,
            height=args.height,
            width=args.width,
            frames=args.frames,
            steps=args.steps,
            guidance=args.guidance,
            text_tokens=args.text_tokens,
            samples=args.samples,
            image_tokens=args.image_tokens,
            layout=args.layout,
            storage_dtype=args.dtype,
            **spec,
        )
    _print_plan(result)
    if args.store:
        result.check(args.store)
        console.print(f"fits the free space of {args.store}")
    return 0


def _print_plan(result) -> None:
    """Print a :class:`~attnlens.store.Plan`: bytes per variable, per sample and per run."""
    from attnlens.store.planning import format_bytes

    console.print(
        f"[bold]{result.model}[/]: {result.text_tokens} text + {result.image_tokens} image tokens per forward"
    )
    table = Table(title=f"what each of {result.samples} sample(s) writes")
    for column in ("variable", "dims", "per sample", "dtype", "bytes per sample"):
        table.add_column(column, justify="right" if column == "bytes per sample" else "left")
    for name, (sizes, dtype) in result.variables.items():
        shape = " × ".join(str(n) for n in sizes.values())
        table.add_row(name, ", ".join(sizes), shape, dtype, format_bytes(result.per_sample[name]))
    labels = result.per_sample["token labels"] + result.per_sample["record"]
    table.add_row("token labels, record", "", "", "", format_bytes(labels))
    console.print(table)
    console.print(f"per sample: {format_bytes(result.sample_bytes)} ({result.sample_bytes} bytes)")
    console.print(
        f"per run of {result.samples} sample(s): {format_bytes(result.total)} ({result.total} bytes)"
    )
    for note in result.notes:
        console.print(f"note: {note}")


def _cmd_capture(args: argparse.Namespace) -> int:
    """Capture a prompts file into one store: one process, or one rank per GPU under torchrun."""
    from attnlens import batch
    from attnlens.models.registry import resolve
    from attnlens.store import plan

    _check(positive={"--steps": args.steps})
    prompts = batch.read_prompts(args.prompts)
    place = batch.world()
    spec = _spec_fields(args)
    if args.timesteps:
        spec["timesteps"] = args.timesteps
    with console.status(f"loading {args.model}"):
        pipe = _load_model(args.model)
        if str(getattr(pipe, "device", "")) != place.device():
            pipe.to(place.device())
    shape = batch.geometry(pipe, height=args.height, width=args.width, text_tokens=args.text_tokens)
    adapter = resolve(pipe)[0]
    forwards = adapter.forwards_per_step(pipe, guidance_scale=args.guidance_scale)
    estimate = plan(pipe, steps=args.steps, samples=len(prompts), guidance=forwards, **shape, **spec)
    if place.rank == 0:
        _print_plan(estimate)
        if place.size > 1:
            console.print(f"{len(prompts)} prompts over {place.size} ranks")
    estimate.check(args.store)
    options = {
        "height": shape["height"],
        "width": shape["width"],
        "max_sequence_length": shape["text_tokens"],
        "guidance_scale": args.guidance_scale,
    }
    summary = batch.capture_prompts(
        pipe, prompts, args.store, steps=args.steps, rank=place, pipeline_options=options, **spec
    )
    console.print(str(summary), soft_wrap=True, markup=False)
    return 0 if summary.ok else 1


def _cmd_sinks(args: argparse.Namespace) -> int:
    """Find attention sinks in a store (or a capture of the tiny FLUX); print a table, write a figure."""
    from attnlens.analysis import find_sinks, plot_sinks, sinks_by_layer
    from attnlens.cluster import cluster
    from attnlens.errors import InputError

    _check(
        outputs={"--out": args.out} if args.out else {},
        positive={
            "--min-ratio": args.min_ratio,
            "--steps": args.steps,
            "--connect-timeout": args.connect_timeout,
        },
        shares={"--head-share": args.head_share, "--epsilon": args.epsilon},
    )
    if args.store is not None:
        from attnlens.store import open_store

        ds, source = open_store(args.store), args.store
    else:
        if args.scheduler or args.workers:
            raise InputError("--scheduler and --workers analyse a STORE: give one")
        source = "a tiny random-weight FLUX pipeline"
        ds = _demo_capture(args.prompt, args.steps, keep=("key_mass", "cross", "hidden_norm"))
    with cluster(
        args.scheduler, workers=args.workers, memory_limit=args.memory_limit, timeout=args.connect_timeout
    ) as client:
        if client is not None:
            console.print(f"computing on {client.scheduler.address} ({len(client.nthreads())} worker(s))")
        sinks = find_sinks(ds, min_ratio=args.min_ratio, head_share=args.head_share, epsilon=args.epsilon)
        rows = sinks_by_layer(sinks, ds)
        figure = plot_sinks(sinks, ds) if args.out else None
    table = Table(title=f"attention sinks of {source} (means over samples and steps)")
    columns = {
        "layer": "layer",
        "gas": "GAS tokens (share of steps)",
        "gas_share": "GAS share",
        "gu_sink_heads": f"heads α>{args.epsilon:g}",
        "high_norm": "high-norm tokens",
        "massive": "massive",
        "top_kind": "top kind",
    }
    shown = [c for c in columns if c in rows]
    for column in shown:
        left = column in ("layer", "gas", "top_kind")
        table.add_column(columns[column], justify="left" if left else "right")
    for row in rows.to_dict("records"):
        cells = []
        for column in shown:
            value = row[column]
            if column == "top_kind":
                value = f"{value} ({row['top_kind_share']:.0%})"
            elif isinstance(value, float):
                value = f"{value:.3f}" if column in ("gas_share", "gu_sink_heads") else f"{value:.1f}"
            cells.append(str(value) or "—")
        table.add_row(*cells)
    console.print(table)
    console.print(f"query independence measured from: {sinks.attrs['query_share_from']}")
    if figure is not None:
        figure.write_html(args.out, include_plotlyjs=True)
        console.print(f"figure written to {args.out}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    """Segment what a referring expression names in an image with RefAM; write the mask as a PNG."""
    from PIL import Image

    from attnlens import refam

    image = _check(
        images={"IMAGE": args.image},
        outputs={"--out": args.out, **({"--heatmap": args.heatmap} if args.heatmap else {})},
        shares={"--t": args.t} if args.t is not None else {},
    )
    given = {"t": args.t, "gas": args.gas, "caption": args.caption}  # unset: the model's chosen options
    options = {
        **_refam_options(args.option),
        **{k: v for k, v in given.items() if v is not None},
        "seed": args.seed,
        "refine": not args.no_refine,
    }
    with console.status(f"loading {args.model}"):
        model = _load_model(args.model)
        segmenter = _load_segmenter(args.segmenter) if args.segmenter else None
    with console.status(f"segmenting {args.expression!r}"):
        result = refam.segment(image, args.expression, model=model, segmenter=segmenter, **options)
    Image.fromarray(result.mask.astype(np.uint8) * 255).save(args.out)
    if args.heatmap:
        Image.fromarray(np.round(result.heatmap * 255).astype(np.uint8)).save(args.heatmap)
    info = result.info
    console.print(f"target words: {', '.join(result.prompt.target_words)}  (prompt: {result.prompt.text!r})")
    console.print(
        f"GAS: {info['gas_applied']}  refiner: {info['refiner']}  token grid: {info['grid']}  "
        f"points (x, y): {np.round(result.points, 1).tolist()}"
    )
    console.print(f"mask: {result.mask.mean():.1%} of {image.width} × {image.height} pixels → {args.out}")
    return 0


def _check(
    *,
    images: dict[str, str] | None = None,
    outputs: dict[str, str] | None = None,
    folders: dict[str, str] | None = None,
    positive: dict[str, float] | None = None,
    shares: dict[str, float] | None = None,
):
    """Check a command's inputs before it computes anything; return the (last) image opened.

    Each argument maps the option's name to its value: ``images`` must be files PIL can read,
    ``outputs`` files whose folder exists and is writable, ``folders`` folders that exist or can
    be made, ``positive`` numbers above 0, ``shares`` numbers in ``(0, 1]``. Raises
    :class:`~attnlens.errors.InputError` naming the first that is not.
    """
    import os
    from pathlib import Path

    from attnlens.errors import InputError

    def writable(folder: Path, name: str, value: str) -> None:
        if not folder.is_dir():
            raise InputError(f"{name} {value}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise InputError(f"{name} {value}: the folder {folder} is not writable")

    for name, value in (positive or {}).items():
        if not value > 0:
            raise InputError(f"{name} must be above 0; got {value:g}")
    for name, value in (shares or {}).items():
        if not 0 < value <= 1:
            raise InputError(f"{name} must lie in (0, 1]; got {value:g}")
    for name, value in (outputs or {}).items():
        path = Path(value)
        if path.is_dir():
            raise InputError(f"{name} {value} is a folder; give a file name")
        writable(path.absolute().parent, name, value)
    for name, value in (folders or {}).items():
        path = Path(value).absolute()
        if path.exists() and not path.is_dir():
            raise InputError(f"{name} {value} is a file; give a folder")
        existing = next(p for p in (path, *path.parents) if p.exists())
        writable(existing, name, value)
    image = None
    for name, value in (images or {}).items():
        from PIL import Image, UnidentifiedImageError

        path = Path(value)
        if not path.is_file():
            raise InputError(
                f"{name} {value}: no such file" if not path.exists() else f"{name} {value} is a folder"
            )
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InputError(f"{name} {value} is not an image PIL can read ({type(exc).__name__})") from None
    return image


def _refam_options(items: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items as RefAM options: Python literals, else bare words (gas=redirect)."""
    import ast

    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def _cmd_eval(args: argparse.Namespace) -> int:
    """Score RefAM on a benchmark split; resumable; sharded by rank under torchrun / accelerate launch."""

    from attnlens.datasets import load
    from attnlens.refam.evaluation import ABLATIONS, evaluate

    options = _refam_options(args.option)
    variants = {"RefAM": {}}
    if args.ablate is not None:
        unknown = sorted(set(args.ablate) - set(ABLATIONS))
        if unknown:
            from attnlens.errors import choices

            raise SystemExit(f"unknown ablation(s) {unknown}; choose from: {choices(ABLATIONS, 20)}")
        variants = {k: v for k, v in ABLATIONS.items() if not args.ablate or k in args.ablate or k == "RefAM"}
    with console.status(f"loading {args.model}"):
        model = _load_model(args.model)
        segmenter = _load_segmenter(args.segmenter) if args.segmenter else None
    # an embedded model is scored on the ShapesRef world it was trained on
    world = {"world": model.world} if args.dataset.startswith("shapesref") and hasattr(model, "world") else {}
    dataset = load(args.dataset, args.split, args.root, limit=args.limit, **world)
    summary = evaluate(
        dataset, model, args.out, segmenter=segmenter, variants=variants, model_name=args.model, **options
    )
    if summary is not None:
        from pathlib import Path

        console.print(Path(args.out, "summary.md").read_text())
        console.print(f"per-sample results: {Path(args.out, 'samples.parquet')}")
    return 0


def _load_model(name: str):
    """A zoo name, a folder written by ``attnlens zoo train``, or a local diffusers pipeline folder."""
    from pathlib import Path

    from attnlens import zoo
    from attnlens.errors import UnsupportedModelError

    if name in zoo.available():
        return zoo.load(name)
    folder = Path(name)
    if (folder / "model_index.json").exists():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if (folder / "model.safetensors").exists():
        return zoo.ShapesPipeline.load(folder)
    raise UnsupportedModelError(
        f"--model {name!r} is neither an embedded model ({', '.join(zoo.available()) or 'none shipped'}) "
        "nor a folder holding a diffusers pipeline (model_index.json) or a ShapesPipeline (model.safetensors)"
    )


def _load_segmenter(folder: str) -> tuple:
    """A SAM or SAM 2 checkpoint folder → the ``(model, processor)`` pair RefAM takes."""
    import transformers

    kind = transformers.AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    classes = {"sam": ("SamModel", "SamProcessor"), "sam2": ("Sam2Model", "Sam2Processor")}
    if kind not in classes:
        from attnlens.refam import SegmenterMismatchError

        raise SegmenterMismatchError(f"--segmenter {folder} holds a {kind!r} model; RefAM takes SAM or SAM 2")
    model, processor = (getattr(transformers, c) for c in classes[kind])
    return (
        model.from_pretrained(folder, local_files_only=True).eval(),
        processor.from_pretrained(folder, local_files_only=True),
    )


def _demo_capture(prompt: str, steps: int, **spec: object):
    """``cap.result`` of a short sampling run of the tiny random FLUX pipeline (2 + 2 blocks)."""
    import torch

    import attnlens
    from attnlens.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(num_layers=2, num_single_layers=2)
    pipe.set_progress_bar_config(desc="sampling", disable=False)
    with attnlens.capture(pipe, **spec) as cap:
        pipe(
            prompt,
            height=32,
            width=32,
            num_inference_steps=steps,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    return cap.result


def _grid(ds, np) -> str:
    return " × ".join(str(int(np.max(ds[c].values)) + 1) for c in ("frame", "y", "x"))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``attnlens segment: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_SEGMENTER_HELP = (
    "SAM / SAM 2 checkpoint folder (default: the refiner option, the model's choice or threshold)"
)
_OPTION_HELP = "a RefAM option, e.g. t=0.3 or refiner=region (repeat for more)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlens", description="Look inside the attention of diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="the main job on the embedded model: capture, sinks, segmentation, report"
    )
    demo.add_argument("--out", default="attnlens-demo", help="folder for the store and report.html")
    demo.add_argument("--model", default="shapes-flux", help="embedded model")
    demo.add_argument("--scenes", type=int, default=6, help="ShapesRef test scenes to draw and segment")
    demo.add_argument("--steps", type=int, default=20, help="sampling steps per drawing")
    demo.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    demo.set_defaults(func=_cmd_demo)
    inspect = sub.add_parser("inspect", help="print what an attention store holds")
    inspect.add_argument("store", help="path or fsspec URL of the store")
    inspect.add_argument("--sample", help="sample id whose tokens to list (default: the first)")
    inspect.add_argument("--verify", action="store_true", help="read every chunk, reporting damaged ones")
    inspect.set_defaults(func=_cmd_inspect)
    capt = sub.add_parser(
        "capture", help="capture a prompts file into a store (resumable; one rank per GPU under torchrun)"
    )
    capt.add_argument("prompts", help="text file (one prompt a line) or JSONL of {prompt, id, seed}")
    capt.add_argument("--model", default="shapes-flux", help="embedded model, or a diffusers pipeline folder")
    capt.add_argument("--store", required=True, help="path or fsspec URL of the store (s3://, gs://, ...)")
    _add_spec_arguments(capt)
    capt.add_argument("--steps", type=int, default=20, help="denoising steps per sample")
    capt.add_argument("--timesteps", nargs="+", type=int, help="capture these step indices only")
    capt.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    capt.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    capt.add_argument("--text-tokens", type=int, help="max_sequence_length (default: the pipeline's)")
    capt.add_argument("--guidance-scale", type=float, help="the pipeline's guidance_scale (default: its own)")
    capt.set_defaults(func=_cmd_capture)
    planned = sub.add_parser("plan", help="the bytes a capture will write to a store, before it runs")
    planned.add_argument("model", help="embedded model name, or a diffusers pipeline or transformer folder")
    planned.add_argument("--height", type=int, help="image (frame) height in pixels")
    planned.add_argument("--width", type=int, help="image (frame) width in pixels")
    planned.add_argument("--frames", type=int, default=1, help="video frames")
    planned.add_argument("--image-tokens", type=int, help="image tokens per forward, instead of height/width")
    planned.add_argument("--steps", type=int, required=True, help="denoising steps per sample")
    planned.add_argument("--guidance", type=int, default=1, help="forwards per step (2: both CFG branches)")
    planned.add_argument("--text-tokens", type=int, required=True, help="prompt tokens as encoded (padded)")
    planned.add_argument("--samples", type=int, default=1, help="samples in the run")
    _add_spec_arguments(planned)
    planned.add_argument("--dtype", choices=["float16", "bfloat16"], help="storage dtype of probabilities")
    planned.add_argument(
        "--layout", default="chunks", choices=["chunks", "shards"], help="the store's layout"
    )
    planned.add_argument("--store", help="check that the run fits the free space of this store's disk")
    planned.set_defaults(func=_cmd_plan)
    sinks = sub.add_parser("sinks", help="find attention sinks per layer, print them, write a plotly figure")
    sinks.add_argument("store", nargs="?", help="path or fsspec URL of a store (default: a tiny FLUX run)")
    sinks.add_argument("--out", default="sinks.html", help="HTML figure to write ('' for none)")
    sinks.add_argument("--min-ratio", type=float, default=10.0, help="smallest sink ratio N·α of a sink")
    sinks.add_argument("--head-share", type=float, default=0.5, help="share of heads a GAS is a sink in")
    sinks.add_argument("--epsilon", type=float, default=0.3, help="Gu et al.'s threshold on α")
    sinks.add_argument("--steps", type=int, default=2, help="denoising steps of the capture without a store")
    sinks.add_argument("--prompt", default="a red mug on the left of a wooden table", help="without a store")
    sinks.add_argument("--scheduler", help="compute on this dask.distributed scheduler, e.g. tcp://host:8786")
    sinks.add_argument("--workers", type=int, help="compute on a local dask cluster of this many workers")
    sinks.add_argument("--memory-limit", help="memory limit of each local worker, e.g. 2GiB (spills beyond)")
    sinks.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for --scheduler")
    sinks.set_defaults(func=_cmd_sinks)
    seg = sub.add_parser("segment", help="segment what a referring expression names (RefAM)")
    seg.add_argument("image", help="image file (any size and mode)")
    seg.add_argument("expression", help='referring expression, e.g. "the red mug on the left"')
    seg.add_argument("--out", default="mask.png", help="mask PNG to write (input size, 0/255)")
    seg.add_argument("--heatmap", help="also write the heatmap as a grey PNG")
    seg.add_argument("--model", default="shapes-flux", help="zoo model or diffusers folder")
    seg.add_argument("--segmenter", help=_SEGMENTER_HELP)
    seg.add_argument("--caption", help='caption around the expression, e.g. "a photo of {expression}"')
    seg.add_argument(
        "--t", type=float, help="flow time of the noised forward (default: the model's, else 0.5)"
    )
    seg.add_argument("--gas", choices=["suppress", "redirect", "none"], help="sinks (default: the model's)")
    seg.add_argument("--seed", type=int, default=0, help="seed of the noise")
    seg.add_argument("--no-refine", action="store_true", help="Otsu's threshold of the heatmap only")
    seg.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=_OPTION_HELP)
    seg.set_defaults(func=_cmd_segment)
    ev = sub.add_parser("eval", help="score RefAM on a benchmark (resumable; shards under torchrun)")
    ev.add_argument(
        "--dataset",
        required=True,
        help="refcoco, refcoco+, refcocog, ref-davis17, ref-youtube-vos, shapesref",
    )
    ev.add_argument("--split", required=True, help="val, testA, testB, test (as in the papers)")
    ev.add_argument("--root", help="the dataset's folder (not for shapesref)")
    ev.add_argument("--model", default="shapes-flux", help="zoo model or diffusers pipeline folder")
    ev.add_argument("--segmenter", help=_SEGMENTER_HELP)
    ev.add_argument("--limit", type=int, help="the first N samples only")
    ev.add_argument(
        "--ablate", nargs="*", metavar="VARIANT",
        help="also the ablations and attention-only baselines (all, or those named)",
    )  # fmt: skip
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=_OPTION_HELP)
    ev.add_argument("--out", required=True, help="results folder: samples.parquet, summary.md, summary.json")
    ev.set_defaults(func=_cmd_eval)
    zoo = sub.add_parser("zoo", help="the embedded models").add_subparsers(dest="zoo_command", required=True)
    train = zoo.add_parser("train", help="train (or resume training) an embedded model by recipe")
    train.add_argument("recipe", help="a recipe of attnlens.zoo.train.RECIPES, e.g. shape-first")
    train.add_argument("--out", required=True, help="folder for checkpoints, snapshots, weights")
    train.add_argument("--steps", type=int, default=20_000, help="optimiser steps")
    train.add_argument("--batch", type=int, default=64, help="images per step")
    train.add_argument("--seed", type=int, default=0, help="fixes scenes, text choices, noise and weights")
    train.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    train.set_defaults(func=_cmd_zoo_train)
    curve = zoo.add_parser("curve", help="measure a training run's snapshots into its curve.json")
    curve.add_argument("folder", help="a folder written by attnlens zoo train")
    curve.set_defaults(func=_cmd_zoo_curve)
    card = zoo.add_parser("card", help="measure a trained model against ShapesRef's bars; write its card")
    card.add_argument(
        "folder", help="the trained model's folder (config.json, model.safetensors, train_log.json)"
    )
    card.add_argument("--name", default="shapes-flux", help="the model's name in the card")
    card.add_argument(
        "--curves", nargs="*", default=[], metavar="RUN", help="training runs whose curves the card shows"
    )
    card.set_defaults(func=_cmd_zoo_card)
    return parser


def _cmd_zoo_card(args: argparse.Namespace) -> int:
    """Measure a trained embedded model and write card.md, claims.json, bars.json and refam.json."""
    from pathlib import Path

    from attnlens.zoo import ShapesPipeline
    from attnlens.zoo.card import bars, measure, write_card
    from attnlens.zoo.curves import curve

    curves = {Path(run).name: curve(run) for run in args.curves}
    m = measure(ShapesPipeline.load(args.folder), progress=True)
    _print_frame(bars(m), f"{args.name} against ShapesRef's bars")
    console.print(f"card written to {write_card(args.folder, args.name, m, curves)}")
    return 0


def _cmd_zoo_curve(args: argparse.Namespace) -> int:
    """Measure every new snapshot of a training run and print its learning curve."""
    from attnlens.zoo.curves import curve

    _print_frame(curve(args.folder), f"learning curve of {args.folder} (val)")
    return 0


def _cmd_zoo_train(args: argparse.Namespace) -> int:
    """Train an embedded model; an interrupted run resumes from its last checkpoint in --out."""
    from attnlens.errors import InputError
    from attnlens.zoo.train import recipe, train

    try:
        model, config = recipe(args.recipe, steps=args.steps, batch=args.batch, seed=args.seed)
        train(args.out, model, config, device=args.device)
    except ValueError as exc:  # an unknown recipe, or a checkpoint of another configuration
        raise InputError(str(exc)) from exc
    console.print(f"trained {args.recipe}: weights and train_log.json in {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnlens`` command."""
    from attnlens.errors import AttnlensError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (AttnlensError, OSError) as exc:  # OSError: unreadable or missing files
        from rich.markup import escape

        # one line however long (no wrapping), and the message's brackets are text, not markup
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
