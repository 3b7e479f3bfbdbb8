"""Store write throughput and compression against ``numpy.save``, and capture-to-store overhead.

Measured side by side in one run, on attention captured from a random-weight FLUX-architecture
transformer (``attnlens.testing.tiny_flux_transformer``, widened to 4 heads, over a 32 × 32
token grid and 128 text tokens):

1. write throughput (MB/s of uncompressed array bytes) of :class:`attnlens.store.StoreWriter`
   with each compression, one sample group per submit as a capture streams them, against
   ``numpy.save`` of the same per-sample arrays into ``.npy`` files on the same disk; once until
   the writer returns (page cache) and once including an fsync of every file written (durable);
2. compression ratio of the store (array bytes / bytes on disk);
3. wall time of a multi-sample capture that streams to a store (until every sample is written)
   against the same capture kept in memory (until ``cap.result`` is assembled).

torch runs one intra-op thread by default (``--threads``): on 2 shared cores, two threads
oversubscribe and a forward's time varies tenfold; one thread leaves a core to the writer
thread, as a GPU run leaves the CPU to it.

Each measurement alternates the contenders and reports the median of ``--repeats`` runs.
Results print as a Markdown section, which replaces this benchmark's section of BENCHMARKS.md
(or is added to it) unless ``--no-write``.

    python benchmarks/store_throughput.py            # a few minutes on 2 CPU cores
    python benchmarks/store_throughput.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

import attnlens
from attnlens.store import StoreWriter, open_store, stored_bytes
from attnlens.testing import flux_inputs, tiny_flux_transformer

ROOT = Path(__file__).resolve().parent.parent
TIMESTEPS = (1.0, 0.75, 0.5, 0.25)


def make_model():
    return tiny_flux_transformer(num_layers=2, num_single_layers=2, num_attention_heads=4)


def run_capture(model, n_samples: int, grid: int, text: int, store: str | None, keep) -> attnlens.Capture:
    """``n_samples`` samples of ``len(TIMESTEPS)`` denoising steps each."""
    with attnlens.capture(model, keep=keep, store=store) as cap:
        for i in range(n_samples):
            with cap.sample(f"s{i}"):
                for t in TIMESTEPS:
                    model(**flux_inputs(model, height=grid, width=grid, text_len=text, timestep=t, seed=i))
    return cap


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to the disk."""
    for root, _, files in os.walk(folder):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def timed_write(write: Callable[[Path], object], folder: Path, durable: bool) -> float:
    os.sync()  # start from clean writeback, so that no writer pays for another's dirty pages
    start = time.perf_counter()
    write(folder)
    if durable:
        fsync_tree(folder)
    return time.perf_counter() - start


def write_numpy(ds: xr.Dataset, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(ds.sizes["sample"]):
        for name, var in ds.data_vars.items():
            np.save(folder / f"{name}-{i}.npy", np.ascontiguousarray(var.values[i]))


def write_store(ds: xr.Dataset, path: Path, compression: str | None) -> None:
    writer = StoreWriter(path, compression=compression)
    for i in range(ds.sizes["sample"]):  # one group per sample, as a capture streams them
        one = ds.isel(sample=[i]).assign_attrs(prompts=[ds.attrs["prompts"][i]])
        writer.submit([f"s{i}"], lambda one=one: one)
    writer.close()


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {cores} cores available{load}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, zarr {zarr.__version__}, numpy {np.__version__}, "
        f"attnlens {attnlens.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--grid", type=int, default=32, help="image tokens per side of the written data")
    parser.add_argument("--text", type=int, default=128, help="text tokens of the written data")
    parser.add_argument("--capture-grid", type=int, help="image tokens per side, timed captures (--grid)")
    parser.add_argument("--capture-text", type=int, help="text tokens of the timed captures (--text)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; the default 1 leaves a core to the writer, as a GPU run does",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--dir", help="scratch folder on the disk to measure (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.grid, args.text, args.repeats = 2, 8, 16, 1
    args.capture_grid = args.capture_grid or args.grid
    args.capture_text = args.capture_text or args.text
    torch.set_num_threads(args.threads)
    keep = ("cross", "key_mass", "hidden_norm")
    torch.manual_seed(0)
    model = make_model()
    where = machine()
    scratch = Path(tempfile.mkdtemp(prefix="attnlens-bench-", dir=args.dir))
    compressions = ("zstd", "lz4", None)
    try:
        run_capture(model, 1, args.capture_grid, args.capture_text, None, keep)  # warm up both paths
        run_capture(model, 1, args.capture_grid, args.capture_text, str(scratch / "warm.zarr"), keep)
        ds = run_capture(model, args.samples, args.grid, args.text, None, keep).result
        nbytes = sum(v.nbytes for v in ds.data_vars.values())

        writers: dict[str, Callable[[Path], object]] = {"numpy.save": lambda f: write_numpy(ds, f)}
        for c in compressions:
            writers[str(c)] = lambda f, c=c: write_store(ds, f, c)
        write_s = {(name, durable): [] for name in writers for durable in (False, True)}
        for r in range(args.repeats):  # alternate, so that drifting load hits every writer alike
            for durable in (False, True):
                for name, write in writers.items():
                    folder = scratch / f"{name}-{durable}-{r}"
                    write_s[name, durable].append(timed_write(write, folder, durable))
                    if r or durable:
                        shutil.rmtree(folder)
        disk = {"numpy.save": sum(f.stat().st_size for f in (scratch / "numpy.save-False-0").iterdir())}
        for c in compressions:
            path = scratch / f"{c}-False-0"
            written = open_store(path).drop_vars("sample_id").load()
            xr.testing.assert_identical(written.drop_attrs(), ds.drop_attrs())  # it holds what was timed
            disk[str(c)] = sum(v for k, v in stored_bytes(path).items() if k in ds.data_vars)
        opened = statistics.median(timed(lambda: open_store(scratch / "zstd-False-0")) for _ in range(5))

        memory_s, streamed_s = [], []
        small = (args.samples, args.capture_grid, args.capture_text)
        for r in range(args.repeats):
            memory_s.append(timed(lambda: run_capture(model, *small, None, keep).result))
            path = str(scratch / f"capture-{r}.zarr")
            streamed_s.append(timed(lambda path=path: run_capture(model, *small, path, keep)))
        captured = sum(v.nbytes for v in open_store(path).data_vars.values()) / 1e6
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    mb = nbytes / 1e6
    rows = []
    for name in writers:
        label = (
            name if name == "numpy.save" else f"store, compression={name if name == 'None' else repr(name)}"
        )
        cells = []
        for durable in (False, True):
            t, t_np = (
                statistics.median(write_s[name, durable]),
                statistics.median(write_s["numpy.save", durable]),
            )
            cells.append(f"{mb / t:.0f} | {t_np / t:.2f}×")
        runs = f"{_fmt(write_s[name, False])} / {_fmt(write_s[name, True])}"
        rows.append(f"| {label} | {' | '.join(cells)} | {nbytes / disk[name]:.2f}× | {runs} |")
    t_mem, t_stream = statistics.median(memory_s), statistics.median(streamed_s)
    per_sample = ", ".join(f"`{n}` {v.shape[1:]}" for n, v in ds.data_vars.items())
    table = "\n".join(rows)
    section = f"""
## Store throughput (`benchmarks/store_throughput.py`)

Machine: {where}.
Disk: a temporary folder on `{scratch.parent}`.
Data: {args.samples} samples × {len(TIMESTEPS)} steps captured from a random-weight FLUX-architecture
transformer (4 layers, 4 heads, {args.grid}×{args.grid} image tokens, {args.text} text tokens), keeping
{", ".join(keep)} in float32: {mb:.1f} MB, per sample {per_sample}.
Median of {args.repeats} alternating runs; the store receives one sample group per submit;
torch runs {args.threads} intra-op thread(s).

Each run starts after `os.sync()`; "page cache" stops the clock when the writer returns, "durable"
after an fsync of every file written (runs: page cache / durable). Throughput counts array bytes;
the aim is ≥ 0.8× numpy.save.

| writer | page cache MB/s | vs numpy.save | durable MB/s | vs numpy.save | compression | runs (s) |
|---|---|---|---|---|---|---|
{table}

Capture of {args.samples} samples × {len(TIMESTEPS)} steps ({args.capture_grid}×{args.capture_grid} image
tokens, {args.capture_text} text tokens, {captured:.1f} MB kept), until every sample is in the store
(default zstd) or until `cap.result` is assembled:

| capture → store (s) | capture in memory (s) | ratio (aim ≤ 1.15×) | runs → store | runs in memory |
|---|---|---|---|---|
| {t_stream:.2f} | {t_mem:.2f} | {t_stream / t_mem:.2f}× | {_fmt(streamed_s)} | {_fmt(memory_s)} |

Opening the store with `open_store` (metadata only): {opened * 1e3:.0f} ms.
Each timed store run creates a new store (its arrays and metadata) before the first sample.
"""
    print(section)
    if not args.no_write and not args.quick:
        out = ROOT / "BENCHMARKS.md"
        print(f"wrote {out}")
        update_section(out, section, where)


def update_section(out: Path, section: str, where: str) -> None:
    """Put ``section`` between this benchmark's markers in ``out``, replacing an earlier run's."""
    begin, end = "<!-- begin store_throughput -->", "<!-- end store_throughput -->"
    block = f"{begin}{section}{end}\n"
    text = out.read_text(encoding="utf-8") if out.exists() else f"# Benchmarks\n\nMachine: {where}.\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    out.write_text(text, encoding="utf-8")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
