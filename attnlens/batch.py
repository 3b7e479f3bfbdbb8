"""Capture a list of prompts into one store, from one process or one rank per GPU on many nodes.

:func:`capture_prompts` runs a pipeline once per prompt inside :func:`attnlens.capture`, each
sample under its declared id, and reports what it did in a :class:`RunSummary`. Under
``torchrun`` or ``accelerate launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the
environment) rank ``r`` of ``w`` takes every ``w``-th prompt from the ``r``-th on and writes its
own ``sample`` slots of the one store; ranks never talk to each other. A run that is stopped
(killed, preempted, a node lost) is resumed by running it again: samples the store holds
complete are skipped, a sample cut short is captured again, none twice.

Prompts come from :func:`read_prompts`: a text file (one prompt a line; ids ``"0"``, ``"1"``,
…, seeds 0, 1, …) or a JSONL file of objects ``{"prompt": ..., "id": ..., "seed": ...}`` (id
and seed optional, defaulting to the line's position among the prompts).

>>> from attnlens.batch import Prompt, capture_prompts
>>> from attnlens.zoo import ShapesPipeline
>>> from attnlens.zoo.shapes import ShapesConfig
>>> pipe = ShapesPipeline.untrained(ShapesConfig(vocab_size=48, num_layers=1, num_single_layers=1))
>>> prompts = [Prompt("a", "a red circle", 0), Prompt("b", "a blue square", 1)]
>>> summary = capture_prompts(pipe, prompts, "memory://doc/batch.zarr", steps=2, keep="key_mass",
...                           heads="mean", progress=False)
>>> summary.captured, summary.failures, summary.ok
(['a', 'b'], {}, True)
>>> capture_prompts(pipe, prompts, "memory://doc/batch.zarr", steps=2, keep="key_mass",
...                 heads="mean", progress=False).skipped  # run again: nothing left to do
['a', 'b']
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["Prompt", "RunSummary", "World", "call_pipeline", "capture_prompts", "read_prompts", "world"]


@dataclass(frozen=True)
class Prompt:
    """One sample to capture: its id in the store, its prompt and the seed of its noise."""

    id: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class World:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job: ``(0, 1, 0)`` alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def device(self) -> str:
        """``cuda:LOCAL_RANK`` where CUDA is there, else ``cpu``."""
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def world(environ: dict[str, str] | None = None) -> World:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as ``torchrun`` and ``accelerate launch`` set them).

    >>> world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    World(rank=3, size=8, local_rank=1)
    >>> world({})
    World(rank=0, size=1, local_rank=0)
    """
    env = os.environ if environ is None else environ
    try:
        rank, size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise InputError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from None
    if not (size >= 1 and 0 <= rank < size and local >= 0):
        raise InputError(f"RANK {rank} and WORLD_SIZE {size} do not describe a rank of a job")
    return World(rank, size, local)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a text file (one a line) or a JSONL file (``.jsonl``: one object a line).

    Blank lines are skipped. Raises :class:`~attnlens.errors.InputError` (one line, with the
    line number) for an empty file, a line that is not a JSON object with a non-empty
    ``"prompt"`` string, an id or seed of the wrong type, or an id given twice.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp(), "p.jsonl")
    >>> _ = path.write_text('{"id": "cat", "prompt": "a cat", "seed": 7}\\n{"prompt": "a dog"}\\n')
    >>> read_prompts(path)
    [Prompt(id='cat', prompt='a cat', seed=7), Prompt(id='1', prompt='a dog', seed=1)]
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"PROMPTS {path}: no such file" if not path.exists() else f"PROMPTS {path} is a folder"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"PROMPTS {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        index = len(prompts)
        where = f"{path}, line {number}"
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(item, dict):
                raise InputError(
                    f'{where}: expected a JSON object with a "prompt", got {type(item).__name__}'
                )
            text = item.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f'{where}: "prompt" must be a non-empty string')
            sid = item.get("id", str(index))
            if not isinstance(sid, str | int) or isinstance(sid, bool) or not str(sid):
                raise InputError(f'{where}: "id" must be a non-empty string or an integer')
            seed = item.get("seed", index)
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise InputError(f'{where}: "seed" must be a non-negative integer')
            sid = str(sid)
        else:
            text, sid, seed = line.strip(), str(index), index
        if sid in seen:
            raise InputError(f"{where}: id {sid!r} is given twice (first on line {seen[sid]})")
        seen[sid] = number
        prompts.append(Prompt(sid, text, seed))
    if not prompts:
        raise InputError(f"PROMPTS {path} holds no prompts")
    return prompts


@dataclass
class RunSummary:
    """What one rank's :func:`capture_prompts` did.

    Attributes:
        store: where the samples went.
        rank: this process's rank; ``world``: the number of ranks.
        assigned: ids this rank is responsible for (every ``world``-th).
        captured: ids captured and written by this run.
        skipped: ids the store already held complete (an earlier run wrote them).
        failures: id → the error that stopped it (``"TypeError: ..."``); nothing of it is written.
        bytes: bytes the captured samples wrote (their chunks, from the store's records).
        seconds: wall time of the run, loading excluded.
    """

    store: str
    rank: int = 0
    world: int = 1
    assigned: list[str] = field(default_factory=list)
    captured: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every assigned sample is in the store."""
        return not self.failures and len(self.captured) + len(self.skipped) == len(self.assigned)

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / len(self.captured) if self.captured else float("nan")

    def __str__(self) -> str:
        from .store.planning import format_bytes

        who = f"rank {self.rank} of {self.world}: " if self.world > 1 else ""
        lines = [
            f"{who}{len(self.captured)} sample(s) captured, {len(self.skipped)} already in the store, "
            f"{len(self.failures)} failed, of {len(self.assigned)}; {format_bytes(self.bytes)} written to "
            f"{self.store} in {self.seconds:.1f} s"
            + (f" ({self.seconds_per_sample:.2f} s per sample)" if self.captured else "")
        ]
        lines += [f"{who}failed: sample {sid!r}: {error}" for sid, error in self.failures.items()]
        return "\n".join(lines)


def call_pipeline(pipe: Any, prompt: Prompt, *, steps: int, **options: Any) -> None:
    """Run ``pipe`` once on ``prompt``: its steps, its seed (a CPU generator), and the ``options`` it takes.

    Works for attnlens' embedded pipelines and diffusers pipelines; options the pipeline's
    ``__call__`` does not take (``height``, ``max_sequence_length``, …) are left out, and a
    diffusers pipeline returns latents (``output_type="latent"``: no VAE decode is needed).
    """
    import torch

    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(prompt.seed)}
    if "output_type" in accepted:
        kwargs["output_type"] = "latent"
    kwargs.update({k: v for k, v in options.items() if v is not None and k in accepted})
    pipe(prompt.prompt, **kwargs)


def capture_prompts(
    pipe: Any,
    prompts: Sequence[Prompt],
    store: Any,
    spec: Any = None,
    *,
    steps: int,
    rank: World | None = None,
    call: Callable[[Any, Prompt], None] | None = None,
    pipeline_options: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    **spec_fields: Any,
) -> RunSummary:
    """Capture this rank's share of ``prompts`` into ``store``; skip what it holds; report.

    Args:
        pipe: a pipeline attnlens supports (embedded or diffusers), on its device already.
        prompts: every prompt of the job, the same list in every rank (:func:`read_prompts`);
            their ids are the store's declared ``sample_ids``.
        store: a path or fsspec URL (``s3://...``, ``gs://...``, ``file://...``) or zarr store.
        spec: a :class:`~attnlens.CaptureSpec`, or its fields as keywords (``keep``, ``layers``, …).
        steps: denoising steps of each sample.
        rank: this process's :class:`World` (default: read from the environment, :func:`world`).
        call: runs the pipeline on one prompt (default: :func:`call_pipeline` with
            ``steps`` and ``pipeline_options``), e.g. to pass images or other arguments.
        pipeline_options: keywords for the pipeline (``height``, ``width``, ``guidance_scale``, …).
        storage_options: passed to fsspec for a store URL.
        progress: show a progress bar (tqdm, one line per rank).

    A sample whose call raises is reported in :attr:`RunSummary.failures` (nothing of it is
    written) and the run goes on with the next; the store's own errors (disk full, a corrupt
    store) stop the run.
    """
    from tqdm.auto import tqdm

    from .capture import capture
    from .store.location import resolve
    from .store.records import load_records

    place = rank if rank is not None else world()
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise InputError("prompt ids must be distinct")
    by_id = {p.id: p for p in prompts}
    mine = ids[place.rank :: place.size]
    summary = RunSummary(str(store), place.rank, place.size, assigned=mine)
    run = call or (lambda p, prompt: call_pipeline(p, prompt, steps=steps, **(pipeline_options or {})))
    start = time.perf_counter()
    with capture(
        pipe, spec, store=store, sample_ids=ids, storage_options=storage_options, **spec_fields
    ) as cap:
        todo = cap.pending(mine)
        summary.skipped = [i for i in mine if i not in set(todo)]
        bar = tqdm(
            todo,
            desc=f"rank {place.rank}" if place.size > 1 else "capture",
            position=place.rank,
            unit="sample",
            disable=not progress,
            leave=True,
        )
        for sid in bar:
            try:
                with cap.sample(sid):
                    run(pipe, by_id[sid])
            except Exception as exc:  # reported in the summary, never skipped silently
                summary.failures[sid] = f"{type(exc).__name__}: {exc}"
                bar.set_postfix(failed=len(summary.failures))
                continue
            summary.captured.append(sid)
        bar.close()
    summary.seconds = time.perf_counter() - start
    if summary.captured:
        records = load_records(*resolve(store, storage_options, read_only=True))
        wrote = set(summary.captured)
        rows = [i for i, sid in enumerate(records.ids) if sid in wrote]
        summary.bytes = int(sum(sizes[rows].sum() for sizes in records.nbytes.values()))
    return summary


def geometry(
    pipe: Any, *, height: int | None = None, width: int | None = None, text_tokens: int | None = None
) -> dict[str, int]:
    """``{"height", "width", "text_tokens"}`` of each sample: as given, else the pipeline's defaults.

    An embedded pipeline draws its fixed image size from its fixed token count; a diffusers
    pipeline's defaults are its ``default_sample_size × vae_scale_factor`` pixels and its
    ``__call__``'s ``max_sequence_length``.
    """
    from .zoo.shapes import ShapesPipeline

    if isinstance(pipe, ShapesPipeline):
        side = pipe.config.image_size
        return {"height": side, "width": side, "text_tokens": pipe.config.max_length}
    size = getattr(pipe, "default_sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    default = size * scale if isinstance(size, int) and isinstance(scale, int) else None
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    tokens = parameter.default if parameter is not None and isinstance(parameter.default, int) else None
    out = {"height": height or default, "width": width or default, "text_tokens": text_tokens or tokens}
    missing = [f"--{k.replace('_', '-')}" for k, v in out.items() if v is None]
    if missing:
        raise InputError(f"{type(pipe).__name__} has no default for {', '.join(missing)}: give them")
    return out  # type: ignore[return-value]
