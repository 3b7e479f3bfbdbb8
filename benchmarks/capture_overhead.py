"""Capture overhead on the CPU at FLUX.1's head size: plain vs attnlens vs the recompute and eager ways.

A FLUX-architecture transformer (1 double + 2 single blocks, 8 heads × 128, random weights,
float32) over 48 × 48 = 2304 image + 512 text tokens. Variants run interleaved, repeat by
repeat, so that the load of other processes hits all alike; each is reported as the median
of its per-repeat ratios to ``plain``:

- ``cross``: ``attnlens.capture(keep="cross")``, every head: the kernel's log-sum-exp, then
  ``exp(q·k·s − lse)`` over the image → text block only;
- ``cross+key_mass``: also the mean incoming attention of every key, by one reverse kernel
  call (the default), or by one pass over the rows;
- ``… (recompute)``: the same with the kernel's log-sum-exp withheld, as with an attention
  backend that returns none: a chunked pass recomputes it (what attnlens did before);
- ``eager``: the textbook way, ``softmax(QKᵀ/√d)`` materialised per call, sliced.

Then ``full`` to a store (``--part full``): the probabilities of every query row, computed in
chunks, against the speed at which the store writes them.

    python benchmarks/capture_overhead.py [--repeats 7] [--part all|overhead|full]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import machine, write_section
from gpu_capture import EagerCapture, _timed

import attnlens
from attnlens import kernels, probs
from attnlens.store import StoreWriter
from attnlens.testing import flux_inputs, tiny_flux_transformer

CONFIG = dict(
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=128,
    num_attention_heads=8,
    joint_attention_dim=256,
    pooled_projection_dim=64,
    axes_dims_rope=[16, 56, 56],
)
SIDE, TEXT = 48, 512
BARS = {"cross": 1.05, "cross+key_mass": 1.5}


class _Withheld:
    """No kernel log-sum-exp: SDPA runs itself and attnlens recomputes the normaliser."""

    def __enter__(self) -> None:
        self.saved = kernels._KERNELS
        kernels._KERNELS = {}

    def __exit__(self, *exc: object) -> None:
        kernels._KERNELS = self.saved


class _Pass:
    """key_mass by one pass over the rows instead of the reverse kernel call."""

    def __enter__(self) -> None:
        self.saved = probs.REVERSE_CALL
        probs.REVERSE_CALL = False

    def __exit__(self, *exc: object) -> None:
        probs.REVERSE_CALL = self.saved


def overhead(repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str]]:
    """Per variant: wall seconds and CPU seconds of each repeat; the normaliser paths each took."""
    model = tiny_flux_transformer(**CONFIG)
    inputs = flux_inputs(model, height=SIDE, width=SIDE, text_len=TEXT)
    last: dict[str, attnlens.Capture] = {}

    def capture(keep: tuple[str, ...], context: type | None = None):
        def run() -> None:
            with (
                context() if context else contextlib.nullcontext(),
                attnlens.capture(model, keep=keep) as cap,
            ):
                model(**inputs)
            last[name_of[run]] = cap  # its Dataset is assembled after the clock stops

        return run

    def eager() -> None:
        with EagerCapture(
            lambda n_key: (slice(TEXT, None), slice(0, TEXT)) if n_key == SIDE**2 + TEXT else None
        ):
            model(**inputs)

    variants = {
        "plain": lambda: model(**inputs),
        "cross": capture(("cross",)),
        "cross+key_mass": capture(("cross", "key_mass")),
        "cross+key_mass (pass over rows)": capture(("cross", "key_mass"), _Pass),
        "cross (recompute)": capture(("cross",), _Withheld),
        "cross+key_mass (recompute)": capture(("cross", "key_mass"), _Withheld),
        "eager": eager,
    }
    name_of = {fn: name for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in variants.items():
                with _timed(False) as elapsed, _timed(False, time.process_time) as used:
                    fn()
                times[name].append(elapsed())
                cpu[name].append(used())
    paths = {
        name: ", ".join(f"{var}: {'/'.join(p)}" for var, p in cap.result.attrs["capture_paths"].items())
        for name, cap in last.items()
    }
    return times, cpu, paths


def one_call(repeats: int) -> dict[str, float]:
    """CPU time of ``key_mass`` alone, given the kernel's lse, by each way, over the SDPA call's."""
    g = torch.Generator().manual_seed(0)
    n, heads, dim = SIDE * SIDE + TEXT, CONFIG["num_attention_heads"], CONFIG["attention_head_dim"]
    q, k, v = (torch.randn(1, n, heads, dim, generator=g).transpose(1, 2) for _ in range(3))  # as FLUX's
    _, lse, _ = kernels.attention(q, k, v)
    ways = {
        "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "pass over rows": lambda: probs.incoming_mass(q, k, lse, scale=dim**-0.5, reverse=False),
        "reverse call": lambda: probs.incoming_mass(q, k, lse, scale=dim**-0.5, reverse=True),
    }
    used: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, fn in ways.items():
                with _timed(False, time.process_time) as elapsed:
                    fn()
                used[name].append(elapsed())
    return {
        name: statistics.median(t / s for t, s in zip(ts[1:], used["SDPA"][1:], strict=True))
        for name, ts in used.items()
    }


def full_to_store(repeats: int) -> dict[str, float]:
    """``full``: its math for one attention call, in CPU time, against the store's write of a forward's worth.

    The math (one FLUX attention call of 1152 tokens, 8 heads, given the kernel's lse, written to
    a preallocated tensor) is timed alone: within a forward it is a small difference of two
    large, noisy times. The store writes the Dataset of one captured forward (3 layers).
    """
    model = tiny_flux_transformer(**CONFIG)
    inputs = flux_inputs(model, height=32, width=32, text_len=128)
    n, heads, dim = 32 * 32 + 128, CONFIG["num_attention_heads"], CONFIG["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, dim, generator=g).transpose(1, 2) for _ in range(3))
    _, lse, _ = kernels.attention(q, k, v)
    sink = probs.TensorSink(torch.empty(1, heads, n, n))
    text, image = torch.arange(128), torch.arange(128, n)
    workdir = Path(tempfile.mkdtemp(prefix="attnlens-full-"))
    math_s, write_wall, write_cpu = [], [], []
    try:
        with torch.no_grad():
            with attnlens.capture(model, keep="full") as cap:
                model(**inputs)
            ds = cap.result
            for i in range(repeats + 1):  # the first round warms up
                with _timed(False, time.process_time) as used:
                    probs.attention_slices(q, k, text=text, image=image, keep=("full",), lse=lse, full=sink)
                with _timed(False) as wall, _timed(False, time.process_time) as cpu:
                    writer = StoreWriter(str(workdir / f"write-{i}.zarr"))
                    writer.submit(None, lambda: ds)
                    writer.close()
                if i:
                    math_s.append(used())
                    write_wall.append(wall())
                    write_cpu.append(cpu())
                shutil.rmtree(workdir / f"write-{i}.zarr")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "call mb": 4 * heads * n * n / 1e6,
        "math cpu": statistics.median(math_s),
        "forward mb": int(ds.full.nbytes) / 1e6,
        "write wall": statistics.median(write_wall),
        "write cpu": statistics.median(write_cpu),
    }


def overhead_section(repeats: int) -> str:
    load = os.getloadavg()[0]
    times, cpu, paths = overhead(repeats)
    rows = []
    for name, ts in times.items():
        wall = [t / p for t, p in zip(ts, times["plain"], strict=True)]
        used = [t / p for t, p in zip(cpu[name], cpu["plain"], strict=True)]
        bar = f"≤ {BARS[name]:.2f}×" if name in BARS else ""
        rows.append(
            f"| {name} | {statistics.median(cpu[name]):.2f} | {statistics.median(used):.3f}× | "
            f"{min(used):.2f}–{max(used):.2f} | {statistics.median(wall):.3f}× | {bar} | "
            f"{paths.get(name, '')} |"
        )
    alone = one_call(repeats)
    return "\n".join(
        [
            "## Capture overhead (`benchmarks/capture_overhead.py`)",
            "",
            f"Machine: {machine()}; load average {load:.1f} at the start (other processes shared the "
            f"cores). FLUX architecture, 1 double + 2 single blocks, 8 heads × 128, {SIDE}×{SIDE} = "
            f"{SIDE * SIDE} image + {TEXT} text tokens, float32, every head kept, torch on "
            f"{torch.get_num_threads()} threads. {repeats} repeats, variants interleaved. A ratio is "
            "the median of per-repeat ratios to `plain`; on this shared machine the process's CPU time "
            "measures the work (its range beside it), wall time follows the other processes' load.",
            "",
            "| variant | median CPU s | vs plain (CPU) | range | vs plain (wall) | bar | capture_paths |",
            "|---|---:|---:|---|---:|---|---|",
            *rows,
            "",
            f"**`key_mass` alone**, given the kernel's lse, for one attention call of that size (8 heads, "
            f"{SIDE * SIDE + TEXT} tokens), in CPU time over the SDPA call's: one pass over the rows "
            f"{alone['pass over rows']:.2f}×, one reverse kernel call {alone['reverse call']:.2f}× (the pass "
            "skips the kernel's product with the values, but writes and reads a chunk of logits).",
        ]
    )


def full_section(repeats: int) -> str:
    full = full_to_store(repeats)
    math_rate = full["call mb"] / full["math cpu"]
    write_rate = full["forward mb"] / full["write wall"]
    if math_rate > write_rate:
        verdict = (
            f"The math outpaces the store {math_rate / write_rate:.1f}×: `full` to a store waits on writes."
        )
    else:
        verdict = f"The store outpaces the math {write_rate / math_rate:.1f}×: the math sets the pace."
    return "\n".join(
        [
            "## `full` to a store (`benchmarks/capture_overhead.py --part full`)",
            "",
            f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f}. Medians of {repeats} repeats. "
            f"The math of `full` for one attention call (FLUX, 8 heads × 128, 1152 tokens: "
            f"{full['call mb']:.0f} MB of float32 probabilities, given the kernel's lse, into a "
            f"preallocated tensor) takes {full['math cpu']:.3f} CPU s: **{math_rate:.0f} MB per CPU "
            f"second**. The store (local disk, default zstd) writes the Dataset of one captured forward "
            f"({full['forward mb']:.0f} MB, 3 layers) in {full['write wall']:.2f} s: "
            f"**{write_rate:.0f} MB/s** ({full['write cpu']:.2f} CPU s). {verdict}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--part", choices=("all", "overhead", "full"), default="all")
    args = parser.parse_args()
    if args.part in ("all", "overhead"):
        body = overhead_section(args.repeats)
        print(body, "\n")
        write_section("capture_overhead", body)
    if args.part in ("all", "full"):
        body = full_section(args.repeats)
        print(body)
        write_section("capture_full_to_store", body)


if __name__ == "__main__":
    main()
