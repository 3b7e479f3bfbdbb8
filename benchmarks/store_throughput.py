"""Store write speed against ``numpy.save``, streaming ``full``, capture overhead, and a 10⁵-sample store.

Measured side by side in one run, on this machine's local disk (``--dir``, default a temporary
folder), each contender alternating with the others, medians of ``--repeats`` runs:

1. **write**: the attention a random-weight FLUX-architecture transformer
   (``attnlens.testing.tiny_flux_transformer``) keeps at FLUX.1-dev's token counts (64 × 64
   image tokens, 512 text tokens), written by :class:`attnlens.store.StoreWriter` in each
   layout, codec and storage dtype, one sample per submit as a capture streams them, against
   ``numpy.save`` of the same per-sample arrays into ``.npy`` files; "page cache" stops the clock
   when the writer returns, "durable" after an fsync of every file and folder written;
2. **stream**: ``full`` of a 4608-token sequence (4096 image + 512 text) streamed region by
   region with :meth:`StoreWriter.stream`, against the same array submitted whole and against
   ``numpy.save``; and the peak memory the stream held;
3. **capture**: a multi-sample capture streaming to a store (until every sample is written)
   against the same capture kept in memory;
4. **large**: a store of ``--large-samples`` samples of small arrays, written by two processes
   into disjoint halves of its declared sample ids; then the time to open it and the time
   ``attnlens inspect`` takes (in this process, and as a new process, whose start imports torch).

Results print as a Markdown section, which replaces this benchmark's section of BENCHMARKS.md
unless ``--no-write``.

    python benchmarks/store_throughput.py                  # about half an hour on 2 loaded cores
    python benchmarks/store_throughput.py --quick          # a smoke run
    python benchmarks/store_throughput.py --sections write stream
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from _report import machine, write_section

import attnlens
from attnlens.schema import DIMS
from attnlens.store import StoreWriter, open_store, stored_bytes
from attnlens.testing import flux_inputs, tiny_flux_transformer

TIMESTEPS = (1.0, 0.75, 0.5, 0.25)
WRITERS = {  # label: StoreWriter options
    "store (default: chunks, no compression)": {},
    "store, layout='shards'": {"layout": "shards"},
    "store, compression='zstd'": {"compression": "zstd"},
    "store, compression='lz4'": {"compression": "lz4"},
    "store, storage_dtype='float16'": {"storage_dtype": "float16"},
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to the disk."""
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


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in seconds)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; every column but the first and the last right-aligned."""
    align = ["---", *["---:"] * (len(header) - 2), "---"]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def capture(model, n_samples: int, grid: int, text: int, store=None, heads="mean") -> attnlens.Capture:
    """``n_samples`` samples of ``len(TIMESTEPS)`` steps, keeping cross, key_mass and hidden_norm."""
    with attnlens.capture(model, keep=("cross", "key_mass", "hidden_norm"), heads=heads, store=store) as cap:
        for i in range(n_samples):
            with cap.sample(f"s{i}"):
                for t in TIMESTEPS:
                    model(**flux_inputs(model, height=grid, width=grid, text_len=text, timestep=t, seed=i))
    return cap


def write_numpy(ds: xr.Dataset, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(ds.sizes["sample"]):
        for name, var in ds.data_vars.items():
            np.save(folder / f"{name}-{i}.npy", np.ascontiguousarray(var.values[i]))


def write_store(ds: xr.Dataset, folder: Path, **options) -> None:
    writer = StoreWriter(folder, **options)
    for i in range(ds.sizes["sample"]):  # one sample per submit, as a capture streams them
        one = ds.isel(sample=slice(i, i + 1))  # a view, as a capture hands over its own arrays
        writer.submit([f"s{i}"], lambda one=one: one)
    writer.close()


def alternate(writers: dict[str, Callable[[Path], object]], scratch: Path, repeats: int) -> dict:
    """Median seconds of each writer into the page cache and durably, runs alternating."""
    runs: dict = {(name, durable): [] for name in writers for durable in (False, True)}
    names = list(writers)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no writer always goes first
        for durable in (False, True):
            for name in order:
                folder = scratch / f"run-{r}-{durable}-{names.index(name)}"
                runs[name, durable].append(timed_write(writers[name], folder, durable))
                shutil.rmtree(folder)
    return runs


def section_write(args, scratch: Path) -> str:
    torch.manual_seed(0)
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2, num_attention_heads=2)
    capture(model, 1, 8, 16)  # warm up
    ds = capture(model, args.samples, args.grid, args.text).result
    nbytes = sum(v.nbytes for v in ds.data_vars.values())
    writers: dict[str, Callable[[Path], object]] = {"numpy.save": lambda f: write_numpy(ds, f)}
    for label, options in WRITERS.items():
        writers[label] = lambda f, options=options: write_store(ds, f, **options)
    loads = [load()]
    runs = alternate(writers, scratch, args.repeats)
    loads.append(load())
    on_disk = {}
    for label, options in WRITERS.items():
        path = scratch / "check.zarr"
        write_store(ds, path, **options)
        back = open_store(path).drop_vars("sample_id").load()
        if "storage_dtype" not in options:
            xr.testing.assert_identical(back.drop_attrs(), ds.drop_attrs())  # it holds what was timed
        on_disk[label] = sum(v for k, v in stored_bytes(path).items() if k in ds.data_vars)
        shutil.rmtree(path)
    rows = []
    reference = {d: statistics.median(runs["numpy.save", d]) for d in (False, True)}
    for name in writers:
        cells = []
        for durable in (False, True):
            t = statistics.median(runs[name, durable])
            cells += [f"{nbytes / t / 1e6:.0f}", f"{t / reference[durable]:.2f}×"]
        ratio = f"{nbytes / on_disk[name]:.2f}×" if name in on_disk else "1.00×"
        times = " / ".join(_runs(runs[name, d]) for d in (False, True))
        rows.append([name, *cells, ratio, times])
    per_sample = ", ".join(f"`{n}` {v.shape[1:]} {v.dtype}" for n, v in ds.data_vars.items())
    header = ["writer", "page cache MB/s", "time vs numpy.save", "durable MB/s", "time vs numpy.save"]
    header += ["compression", "runs (s): cache / durable"]
    return f"""
### Write speed against `numpy.save`

Data: {args.samples} samples × {len(TIMESTEPS)} steps captured from a random-weight FLUX-architecture
transformer (2 double + 2 single blocks, heads averaged) at FLUX.1-dev's token counts ({args.grid}×{args.grid}
image tokens, {args.text} text tokens): {nbytes / 1e6:.0f} MB, per sample {per_sample}. One sample per submit;
median of {args.repeats} runs, the writers alternating (load average {loads[0]} before, {loads[1]} after).
Each run starts after `os.sync()`; "page cache" stops the clock when the writer returns, "durable" after an
fsync of every file and folder written. MB/s count the captured (float32) bytes; "time" is the median time
against `numpy.save`'s (bars: ≤ 2× into the page cache, ≤ 1.25× durable).

{_table(header, rows)}
"""


def section_stream(args, scratch: Path) -> str:
    sizes = {"step": 1, "layer": args.stream_layers, "head": 2, "query_all": 4608, "key": 4608}
    rng = np.random.default_rng(0)
    full = rng.random(tuple(sizes.values()), dtype=np.float32).astype(np.float16)
    nbytes = full.nbytes
    key_mass = np.zeros((1, 1, args.stream_layers, 2, 4608), dtype=np.float32)
    rest = xr.Dataset({"key_mass": (DIMS["key_mass"], key_mass)})

    def streamed(folder: Path, copy: bool = False) -> None:
        writer = StoreWriter(folder, queue_size=2)
        stream = writer.stream("s0", "full", sizes, dtype=np.float16)
        rows = stream.chunks["query_all"]
        for layer in range(args.stream_layers):
            for head in range(2):
                for q in range(0, 4608, rows):  # a chunk at a time, as a capture computes query chunks
                    block = full[0, layer, head, q : q + rows]
                    block = block.copy() if copy else block  # fresh arrays, to measure what is held
                    stream.write(block, step=0, layer=layer, head=head, query_all=slice(q, q + rows))
        writer.submit(["s0"], lambda: rest)
        writer.close()

    whole = rest.assign(full=(DIMS["full"], full[np.newaxis]))

    def at_once(folder: Path) -> None:
        writer = StoreWriter(folder)
        writer.submit(["s0"], lambda: whole)
        writer.close()

    def numpy_save(folder: Path) -> None:
        folder.mkdir()
        np.save(folder / "full.npy", full)

    writers = {
        "numpy.save": numpy_save,
        "store, submitted whole": at_once,
        "store, streamed by query chunks": streamed,
    }
    loads = [load()]
    runs = alternate(writers, scratch, args.repeats)
    loads.append(load())
    tracemalloc.start()
    streamed(scratch / "memory.zarr", copy=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    probe = StoreWriter(scratch / "probe.zarr").stream("p", "full", sizes, dtype=np.float16)
    chunk_rows = probe.chunks["query_all"]
    chunk = chunk_rows * 4608 * 2
    shutil.rmtree(scratch / "memory.zarr")
    shutil.rmtree(scratch / "probe.zarr", ignore_errors=True)
    rows = []
    for name in writers:
        cells = []
        for durable in (False, True):
            t = statistics.median(runs[name, durable])
            whole_t = statistics.median(runs["store, submitted whole", durable])
            cells += [f"{nbytes / t / 1e6:.0f}", f"{whole_t / t:.2f}×"]
        rows.append([name, *cells])
    return f"""
### Streaming `full` region by region

`full` of one sample, {args.stream_layers} layers × 2 heads × 4608 × 4608 (4096 image + 512 text tokens) in
float16, {nbytes / 1e6:.0f} MB: streamed with `StoreWriter.stream(..., queue_size=2)` a chunk at a time
(one head, {chunk_rows} query rows: {chunk / 2**20:.1f} MiB), against the same array submitted whole and
`numpy.save`. Speed relative to the store's own raw write of the whole array (aim ≥ 0.8×);
median of {args.repeats} alternating runs, load average {loads[0]} before, {loads[1]} after.
Peak memory traced while streaming fresh copies of each chunk (tracemalloc): {peak / 2**20:.1f} MiB
({peak / chunk:.1f} chunks), against {nbytes / 2**20:.0f} MiB for the whole array.

{_table(["writer", "page cache MB/s", "vs store, whole", "durable MB/s", "vs store, whole"], rows)}
"""


def section_capture(args, scratch: Path) -> str:
    torch.manual_seed(0)
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2, num_attention_heads=4)
    shape = (args.capture_samples, args.capture_grid, args.capture_text)
    capture(model, 1, args.capture_grid, args.capture_text, heads="all")
    memory_s, store_s = [], []
    for r in range(args.repeats):
        memory_s.append(timed(lambda: capture(model, *shape, heads="all").result))
        path = str(scratch / f"capture-{r}.zarr")
        store_s.append(timed(lambda path=path: capture(model, *shape, store=path, heads="all")))
    kept = sum(v.nbytes for v in open_store(path).data_vars.values()) / 1e6
    t_mem, t_store = statistics.median(memory_s), statistics.median(store_s)
    header = [
        "capture → store (s)",
        "capture in memory (s)",
        "ratio (aim ≤ 1.15×)",
        "runs → store",
        "runs in memory",
    ]
    row = [f"{t_store:.2f}", f"{t_mem:.2f}", f"{t_store / t_mem:.2f}×", _runs(store_s), _runs(memory_s)]
    return f"""
### Capture to a store against capture in memory

{args.capture_samples} samples × {len(TIMESTEPS)} steps ({args.capture_grid}×{args.capture_grid} image tokens,
{args.capture_text} text tokens, every head, {kept:.0f} MB kept), until every sample is in the store or until
`cap.result` is assembled; torch runs {torch.get_num_threads()} thread(s), leaving a core to the writer, as a
GPU run does. Median of {args.repeats} alternating runs.

{_table(header, [row])}
"""


LARGE_WRITER = r"""
import sys
import numpy as np
import attnlens
from attnlens.store import StoreWriter
from attnlens.testing import flux_inputs, tiny_flux_transformer

path, n, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = [f"img{i:06d}" for i in range(n)]
mine = ids[rank::world]
G = 250
model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
with attnlens.capture(model, keep="key_mass", heads="mean") as cap:  # the layout every sample shares
    model(**flux_inputs(model, height=4, width=4, text_len=16, batch=G))
template = cap.result
writer = StoreWriter(path, sample_ids=ids)
for lo in range(0, len(mine), G):
    group = mine[lo : lo + G]
    rng = np.random.default_rng(lo * world + rank)
    ds = template.isel(sample=slice(0, len(group))).copy()
    ds["key_mass"] = ds.key_mass.copy(data=rng.random(ds.key_mass.shape, dtype=np.float32))
    ds.attrs["prompts"] = [f"a red mug on the table, photo {s}" for s in group]
    writer.submit(group, lambda ds=ds: ds)
writer.close()
"""


def section_large(args, scratch: Path) -> str:
    path = Path(args.large_store) if args.large_store else scratch / "large.zarr"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    build_s = None
    if not (path / "zarr.json").exists():
        start = time.perf_counter()
        children = [
            subprocess.Popen(
                [sys.executable, "-c", LARGE_WRITER, str(path), str(args.large_samples), str(r), "2"], env=env
            )
            for r in range(2)
        ]
        if any(child.wait() for child in children):
            raise SystemExit("a writer of the large store failed")
        StoreWriter(path).close()  # nothing to write; consolidates the index once both halves are in
        from attnlens.store.location import resolve
        from attnlens.store.records import load_records, write_index

        store, url = resolve(path, None, read_only=False)
        write_index(store, load_records(store, url))
        build_s = time.perf_counter() - start
    files = sum(len(f) for _, _, f in os.walk(path))
    loads = [load()]
    open_s = [timed(lambda: open_store(path)) for _ in range(args.repeats)]
    ds = open_store(path)
    assert ds.sizes["sample"] == args.large_samples, ds.sizes
    from attnlens.cli import main as cli_main

    def inspect() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(["inspect", str(path)]) == 0

    inspect_s = [timed(inspect) for _ in range(args.repeats)]
    process_s = timed(
        lambda: subprocess.run(
            [sys.executable, "-m", "attnlens.cli", "inspect", str(path)],
            env=env,
            capture_output=True,
            check=True,
        )
    )
    import_s = timed(
        lambda: subprocess.run([sys.executable, "-c", "import attnlens.cli"], env=env, check=True)
    )
    index = path / "_attnlens" / "index.json"
    saved = index.read_bytes()
    index.unlink()
    cold_s = timed(lambda: open_store(path))  # without the index: every record is read
    index.write_bytes(saved)
    loads.append(load())
    header = ["what", "seconds (median)", "runs"]
    rows = [
        ["`open_store` (bar < 1 s)", f"{statistics.median(open_s):.2f}", _runs(open_s)],
        [
            "`attnlens inspect`, in a running Python (bar < 2 s)",
            f"{statistics.median(inspect_s):.2f}",
            _runs(inspect_s),
        ],
        [
            "`attnlens inspect` as a new process",
            f"{process_s:.2f}",
            f"of which Python importing attnlens: {import_s:.2f}",
        ],
        ["`open_store` without the index (each record read)", f"{cold_s:.2f}", ""],
    ]
    built = f"built in {build_s:.0f} s by two processes" if build_s is not None else "built by an earlier run"
    return f"""
### A store of {args.large_samples:,} samples

Small arrays: per sample `key_mass` (1 step, 2 layers, heads averaged, 32 keys) and the labels of 16 text
tokens; a declared store {built} (each writing every other sample id); {files:,} files. Median of
{args.repeats} runs,
load average {loads[0]} before, {loads[1]} after.

{_table(header, rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["write", "stream", "capture", "large"])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--grid", type=int, default=64, help="image tokens per side of the written data")
    parser.add_argument("--text", type=int, default=512, help="text tokens of the written data")
    parser.add_argument("--stream-layers", type=int, default=4)
    parser.add_argument("--capture-samples", type=int, default=6)
    parser.add_argument("--capture-grid", type=int, default=32)
    parser.add_argument("--capture-text", type=int, default=128)
    parser.add_argument("--large-samples", type=int, default=100_000)
    parser.add_argument("--large-store", help="reuse (or build here) the large store")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--dir", help="scratch folder on the disk to measure (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.grid, args.text, args.repeats = 2, 8, 16, 1
        args.stream_layers, args.capture_samples, args.capture_grid, args.capture_text = 1, 2, 8, 16
        args.large_samples = 2000
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="attnlens-bench-", dir=args.dir))
    parts = []
    try:
        for name in args.sections:
            print(f"-- {name}", flush=True)
            parts.append(globals()[f"section_{name}"](args, scratch))
            print(parts[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import zarr

    section = f"""## Store throughput (`benchmarks/store_throughput.py`)

Machine: {machine()}; zarr {zarr.__version__}, numpy {np.__version__}. Disk: a folder on
`{scratch.parent}` (local disk). The machine was shared with model trainings and other test runs (load
averages below): absolute speeds vary run to run; the ratios of contenders measured alternately in one run
are what the bars are about.
{"".join(parts)}"""
    if not args.no_write and not args.quick:
        write_section("store_throughput", section)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
