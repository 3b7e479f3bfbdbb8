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

Then ``full`` to a store: the probabilities of every query row, computed in chunks, against
the speed at which the store writes them.

    python benchmarks/capture_overhead.py [--repeats 7]
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
    """Wall and CPU seconds: a plain forward, ``full`` kept, its Dataset written, ``full`` to a store."""
    model = tiny_flux_transformer(**CONFIG)
    inputs = flux_inputs(model, height=32, width=32, text_len=128)
    workdir = Path(tempfile.mkdtemp(prefix="attnlens-full-"))
    steps = ("plain", "in memory", "write", "to store")
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    nbytes = 0

    def timed(name: str) -> contextlib.ExitStack:
        stack, clocks = contextlib.ExitStack(), {}
        # registered first, so that it runs once both clocks have stopped
        stack.callback(lambda: (wall[name].append(clocks["wall"]()), cpu[name].append(clocks["cpu"]())))
        clocks["wall"] = stack.enter_context(_timed(False))
        clocks["cpu"] = stack.enter_context(_timed(False, time.process_time))
        return stack

    try:
        with torch.no_grad():
            for i in range(repeats + 1):  # the first round warms up
                with timed("plain"):
                    model(**inputs)
                with timed("in memory"), attnlens.capture(model, keep="full") as cap:
                    model(**inputs)
                ds = cap.result
                nbytes = int(ds.full.nbytes)
                with timed("write"):
                    writer = StoreWriter(str(workdir / f"write-{i}.zarr"))
                    writer.submit(None, lambda ds=ds: ds)
                    writer.close()
                with (
                    timed("to store"),
                    attnlens.capture(model, keep="full", store=workdir / f"capture-{i}.zarr"),
                ):
                    model(**inputs)
                for path in workdir.iterdir():
                    shutil.rmtree(path)
                if not i:
                    for ts in (*wall.values(), *cpu.values()):
                        ts.clear()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = {f"{name} wall": statistics.median(ts) for name, ts in wall.items()}
    out |= {f"{name} cpu": statistics.median(ts) for name, ts in cpu.items()}
    out["math cpu"] = statistics.median(m - p for m, p in zip(cpu["in memory"], cpu["plain"], strict=True))
    out["mb"] = nbytes / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times, cpu, paths = overhead(args.repeats)
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
    alone = one_call(args.repeats)
    full = full_to_store(max(3, args.repeats // 2))
    mb, math_s = full["mb"], full["math cpu"]
    body = "\n".join(
        [
            "## Capture overhead (`benchmarks/capture_overhead.py`)",
            "",
            f"Machine: {machine()}; load average {load:.1f} at the start (other processes shared the "
            f"cores). FLUX architecture, 1 double + 2 single blocks, 8 heads × 128, {SIDE}×{SIDE} = "
            f"{SIDE * SIDE} image + {TEXT} text tokens, float32, every head kept, torch on "
            f"{torch.get_num_threads()} threads. {args.repeats} repeats, variants interleaved. A ratio is "
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
            "",
            f"**`full` to a store** (1152 tokens, {mb:.0f} MB of probabilities per forward, local disk, "
            f"default zstd): the math takes {math_s:.2f} CPU s per forward "
            f"({mb / max(math_s, 1e-9):.0f} MB per CPU second); the store writes the same Dataset in "
            f"{full['write wall']:.2f} s "
            f"({mb / full['write wall']:.0f} MB/s; {full['write cpu']:.2f} CPU s, "
            f"{mb / full['write cpu']:.0f} MB per CPU second). Capture to the store, end to end: "
            f"{full['to store wall']:.2f} s ({full['to store cpu']:.2f} CPU s) against "
            f"{full['plain wall']:.2f} s ({full['plain cpu']:.2f} CPU s) for the plain forward.",
        ]
    )
    print(body)
    write_section("capture_overhead", body)


if __name__ == "__main__":
    main()
