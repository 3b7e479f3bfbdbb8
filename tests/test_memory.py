"""Peak memory: a `cross` capture grows with N_image · N_text, not with N²; a store-backed capture
of any number of samples holds about one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Runs in a fresh interpreter so that ru_maxrss (the peak resident set size) measures one
# forward alone: first a plain forward sets the high-water mark, then the captured forward
# may raise it only by what the capture itself allocates.
SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    import attnlens
    from attnlens.testing import tiny_flux_transformer, flux_inputs

    side, chunk_bytes, keep = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    attnlens.probs.REVERSE_CALL = False  # key_mass by the pass over the rows, in chunks of chunk_bytes
    torch.set_num_threads(1)
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    inputs = flux_inputs(model, height=side, width=side, text_len=8)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
        before = peak()
        with attnlens.capture(model, keep=keep, chunk_bytes=chunk_bytes) as cap:
            model(**inputs)
        extra = peak() - before
    print(json.dumps({"extra": extra, "n": side * side + 8, "kept": int(cap.result[keep].nbytes)}))
    """
)


def _extra_peak_bytes(side: int, chunk_bytes: int = 4 * 2**20, keep: str = "cross") -> dict:
    args = [sys.executable, "-c", SCRIPT, str(side), str(chunk_bytes), keep]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cross_capture_memory_does_not_grow_with_n_squared():
    small, large = _extra_peak_bytes(32), _extra_peak_bytes(96)  # N = 1032 and 9224 tokens
    dense = large["n"] ** 2 * 2 * 4  # one float32 N×N matrix for the model's 2 heads: 680 MB
    for r in (small, large):
        print(f"extra peak at N={r['n']}: {r['extra'] / 2**20:.1f} MiB")
    assert large["extra"] < dense / 20
    # 9× the tokens: an N² capture would need 80× the memory; this one stays near what it keeps
    assert large["extra"] < 16 * 2**20 + 20 * large["kept"]
    # the measurement does see N²: key_mass summed over all query rows in one chunk holds one head's
    # dense logits (dense / 2), less what the plain forward's own high-water mark already covers
    unchunked = _extra_peak_bytes(96, chunk_bytes=2**40, keep="key_mass")
    assert unchunked["extra"] > dense / 4


# A capture of n samples streamed to a store on local disk, in a fresh interpreter.
STORE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, tempfile, torch
    import attnlens
    from attnlens.testing import tiny_flux_transformer, flux_inputs

    n = int(sys.argv[1])
    torch.set_num_threads(1)
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    inputs = flux_inputs(model, height=24, width=24, text_len=64)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model(**inputs)
        keep = ("cross", "text_to_image", "key_mass")
        with attnlens.capture(model, keep=keep, store=tmp + "/s.zarr") as cap:
            for _ in range(n):
                cap.next_sample()
                model(**inputs)
        kept, samples = sum(int(cap.result[v].nbytes) for v in keep), cap.result.sizes["sample"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "kept": kept, "samples": samples}))
    """
)


def _store_capture_peak(n: int) -> dict:
    # a fixed mmap threshold: glibc then returns freed arrays to the system, so that the peak counts
    # what the process holds, not the arenas its allocator keeps after the writer thread frees them
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT, str(n)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_store_backed_capture_of_100_samples_holds_about_one():
    two, hundred = _store_capture_peak(2), _store_capture_peak(100)
    assert (two["samples"], hundred["samples"]) == (2, 100)
    per_sample = hundred["kept"] / 100  # 2.4 MB: 100 samples held in memory would add 240 MB
    print(f"peak: 2 samples {two['peak'] / 2**20:.0f} MiB, 100 samples {hundred['peak'] / 2**20:.0f} MiB; "
          f"{per_sample / 2**20:.1f} MiB per sample")  # fmt: skip
    assert hundred["peak"] <= 1.10 * two["peak"]
    assert hundred["peak"] - two["peak"] < 20 * per_sample
