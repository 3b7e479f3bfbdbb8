"""Capture overhead on FLUX: plain forward vs attnlens capture vs an eager softmax capture.

Measured side by side in one run, variants interleaved so that machine noise hits all alike:

- ``plain``: the forward, no hooks;
- ``cross``: ``attnlens.capture(keep="cross")`` (log-sum-exp, chunked);
- ``cross+key_mass``: also the mean incoming attention of every key;
- ``eager``: the textbook way, ``softmax(QKᵀ/√d)`` materialised per layer, then sliced to the
  same image→text block.

On the CPU a scaled-down FLUX config runs; with CUDA, the FLUX.1-dev architecture (19 double +
38 single blocks, 24 heads × 128) at 1024² (4096 image + 512 text tokens) in bf16, random
weights. Results go to BENCHMARKS.md.

    python benchmarks/capture_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager

import torch
from _report import machine, write_section

import attnlens
from attnlens.testing import flux_inputs, tiny_flux_transformer

CPU_CONFIG = dict(
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=256,
    pooled_projection_dim=64,
    axes_dims_rope=[16, 24, 24],
)
FLUX_DEV = dict(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56],
    in_channels=64,
    guidance_embeds=True,
)


@contextmanager
def eager_capture():
    """Capture the image→text block the textbook way: the dense softmax of every layer."""
    import diffusers.models.transformers.transformer_flux as module

    original = module.dispatch_attention_fn
    kept = []

    def dispatch(query, key, value, *args, **kwargs):
        q, k = query.transpose(1, 2), key.transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
        n_text = probs.shape[-1] - n_image[0]
        kept.append(probs[:, :, n_text:, :n_text].to("cpu", non_blocking=True))
        return original(query, key, value, *args, **kwargs)

    n_image = [0]
    module.dispatch_attention_fn = dispatch
    try:
        yield n_image
    finally:
        module.dispatch_attention_fn = original


def run(config: dict, side: int, text_len: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    model = tiny_flux_transformer(**config).to(device, dtype)
    inputs = {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in flux_inputs(model, height=side, width=side, text_len=text_len).items()
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def plain():
        model(**inputs)

    def capture(keep):
        def go():
            with attnlens.capture(model, keep=keep, heads="all"):
                model(**inputs)

        return go

    def eager():
        with eager_capture() as n_image:
            n_image[0] = side * side
            model(**inputs)

    variants = {
        "plain": plain,
        "cross": capture("cross"),
        "cross+key_mass": capture(("cross", "key_mass")),
        "eager": eager,
    }
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in variants.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(title: str, result: dict) -> str:
    base = result["plain"]
    rows = [f"| {name} | {seconds:.3f} | {seconds / base:.2f}× |" for name, seconds in result.items()]
    return "\n".join([f"**{title}**", "", "| variant | median s | vs plain |", "|---|---:|---:|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sections = []
    cpu = run(CPU_CONFIG, side=32, text_len=128, device="cpu", dtype=torch.float32, repeats=args.repeats)
    sections.append(
        table(
            "CPU, FLUX-shaped 4 double + 8 single blocks, 8 heads × 64, 1024 image + 128 text tokens, fp32",
            cpu,
        )
    )
    if torch.cuda.is_available():
        gpu = run(FLUX_DEV, side=64, text_len=512, device="cuda", dtype=torch.bfloat16, repeats=args.repeats)
        sections.append(
            table("GPU, FLUX.1-dev architecture, 1024² (4096 image + 512 text tokens), bf16", gpu)
        )
    else:
        sections.append("No GPU was present for this run: the FLUX.1-dev-scale measurement is not included.")
    body = "\n\n".join(
        [
            "## Capture overhead (`benchmarks/capture_overhead.py`)",
            f"Machine: {machine()}.",
            f"Median of {args.repeats} interleaved repeats.",
            *sections,
        ]
    )
    print(body)
    write_section("capture_overhead", body)


if __name__ == "__main__":
    main()
