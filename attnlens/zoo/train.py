"""Train a ShapesRef model with rectified flow: deterministic from a seed, resumable, by recipe.

Step ``s`` always sees the same training scenes (indices ``s·batch … (s+1)·batch − 1`` of the
endless ``train`` split of its world), the same text choices and the same noise, so an
interrupted run resumed from its last checkpoint ends where an uninterrupted run ends. Attention
is never supervised: the model only learns to generate images from text.

A recipe (:data:`RECIPES`) names an architecture and a :class:`TrainConfig`. A curriculum recipe
starts in ``first_world`` (say, monochrome shapes captioned without colours) and moves to
``world`` once the shapes it draws are read back at ``gate``; after that, ``p_first`` of each batch
still comes from the first world. Every ``snapshot_every`` steps the EMA weights are kept under
``snapshots/`` for the learning curve (:mod:`attnlens.zoo.curves`).

    attnlens zoo train shape-first --out runs/shape-first --steps 20000
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datasets import shapesref
from .shapes import ShapesConfig, ShapesPipeline

__all__ = ["RECIPES", "TrainConfig", "recipe", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        steps: optimiser steps.
        batch: images per step.
        lr: AdamW learning rate after a linear warm-up of ``warmup`` steps.
        p_expression: share of images conditioned on one of their referring expressions
            instead of their caption.
        p_empty: share conditioned on the empty prompt (for classifier-free guidance).
        ema: decay of the exponential moving average whose weights are saved; at step ``s`` the
            decay is ``min(ema, (1 + s) / (10 + s))``, so that early snapshots are not dominated by
            the random initialisation (0.999 alone keeps 45 % of it after 800 steps).
        checkpoint_every: steps between checkpoints.
        seed: fixes scenes, text choices, noise and initialisation.
        world: the :data:`~attnlens.datasets.shapesref.WORLDS` name trained on.
        first_world: the curriculum's first world, or ``None`` for none.
        gate: generated shapes of ``first_world`` read back at least this often end the first stage.
        gate_every: steps between two gate measurements (64 sampled images each).
        p_first: share of each batch drawn from ``first_world`` once the gate is passed.
        snapshot_every: steps between two EMA snapshots for the learning curve (0: none).
    """

    steps: int = 20_000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    p_expression: float = 0.2
    p_empty: float = 0.1
    ema: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    world: str = "v1"
    first_world: str | None = None
    gate: float = 0.8
    gate_every: int = 400
    p_first: float = 0.25
    snapshot_every: int = 800


RECIPES: dict[str, dict[str, Any]] = {
    "words": {"train": {"world": "v2"}},
    "shape-first": {"train": {"world": "v2", "first_world": "v2-mono"}},
    "minilm": {"model": {"text_encoder": "minilm"}, "train": {"world": "v2"}},
}
"""Recipe name → ``{"model": ShapesConfig fields, "train": TrainConfig fields}`` (defaults elsewhere).

- ``words``: the v2 world from the first step; a learned word table, pooled input zero.
- ``shape-first``: monochrome shapes with colour-free captions until generated shapes are read
  back at 0.8, then the v2 world with a quarter of monochrome scenes kept.
- ``minilm``: the v2 world read through a frozen pretrained text encoder (all-MiniLM-L6-v2, the
  ``minilm`` extra), as FLUX reads T5: real contextual embeddings of stop words, punctuation and
  ``[CLS]``/``[SEP]``.
"""


def recipe(name: str, **train: Any) -> tuple[ShapesConfig, TrainConfig]:
    """The architecture and training configuration of recipe ``name`` (``train`` overrides fields).

    >>> model, config = recipe("shape-first", steps=10)
    >>> model.world, model.grid, config.first_world, config.steps
    ('v2', 8, 'v2-mono', 10)
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    spec = RECIPES[name]
    config = TrainConfig(**(spec.get("train", {}) | train))
    return ShapesConfig.for_world(config.world, **spec.get("model", {})), config


def batch_at(
    step: int, config: TrainConfig, pipe: ShapesPipeline, first_share: float = 0.0
) -> tuple[torch.Tensor, list[str]]:
    """Images ``(batch, 3, H, W)`` in ``[-1, 1]`` and their prompts for training step ``step``.

    ``first_share`` of the images (in expectation) come from ``config.first_world``.
    """
    rng = np.random.default_rng([config.seed, step])
    images, prompts = [], []
    for k in range(config.batch):
        world = config.first_world if rng.random() < first_share else config.world
        (scene,) = shapesref.split("train", n=1, start=step * config.batch + k, world=world)
        images.append(scene.image)
        u = rng.random()
        if u < config.p_empty:
            prompts.append("")
        elif u < config.p_empty + config.p_expression and scene.expressions:
            prompts.append(scene.expressions[rng.integers(len(scene.expressions))].text)
        else:
            prompts.append(scene.caption)
    x = torch.as_tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    return x.to(pipe.device), prompts


def train(
    out: str | Path,
    model: ShapesConfig | None = None,
    config: TrainConfig | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
) -> ShapesPipeline:
    """Train (or resume training) a ShapesRef model and save it to ``out``.

    ``out`` receives ``run.json`` (both configurations), ``checkpoint.pt`` every
    ``checkpoint_every`` steps (weights, EMA, optimiser state, the curriculum's gate readings, and
    one entry per run: steps, images, wall time, hardware), EMA snapshots under ``snapshots/``,
    and at the end the EMA weights as ``config.json`` + ``model.safetensors`` plus
    ``train_log.json``.

    Returns:
        the trained pipeline (EMA weights).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or TrainConfig()
    model = model or ShapesConfig.for_world(config.world)
    if model.world != config.world:
        raise ValueError(f"the model is sized for world {model.world!r} but trains on {config.world!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = {"model_config": asdict(model), "train_config": asdict(config)}
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    pipe = ShapesPipeline.untrained(model, seed=config.seed).to(device)
    params = [p for m in pipe.modules() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in pipe.modules()]
    state: dict[str, Any] = {"step": 0, "log": [], "wall": 0.0, "runs": [], "gates": [], "gate_step": None}
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        # steps may change between runs (train longer, or stop early): the schedule does not depend on it
        # fields added since the checkpoint was written take their defaults
        same = asdict(TrainConfig(**{**saved["train_config"], "steps": config.steps})) == asdict(config)
        if asdict(ShapesConfig(**saved["model_config"])) != asdict(model) or not same:
            raise ValueError(f"{checkpoint} was written with another configuration; use a new --out folder")
        for m, s in zip(pipe.modules(), saved["modules"], strict=True):
            m.load_state_dict(s)
        for m, s in zip(ema, saved["ema"], strict=True):
            m.load_state_dict(s)
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved.get(k, v) for k, v in state.items()}
    for m in pipe.modules():
        m.train()
    ema_pipe = ShapesPipeline(ema[0], ema[1], pipe.tokenizer, model)

    start = min(state["step"], config.steps)
    run = {"start_step": start, "end_step": start, "wall_seconds": 0.0, "hardware": _hardware(device)}
    state["runs"].append(run)
    bar = tqdm(
        range(start, config.steps), initial=start, total=config.steps, desc="training", disable=not progress
    )
    began, wall_before = time.perf_counter(), state["wall"]
    for step in bar:
        first_share = _first_share(config, state, step)
        measured = state["gates"] and state["gates"][-1][0] == step  # before an interruption
        if first_share == 1.0 and step and step % config.gate_every == 0 and not measured:
            shape = _gate_reading(ema_pipe, config.first_world)
            state["gates"].append((step, round(shape, 4)))
            if shape >= config.gate:
                state["gate_step"] = step
                first_share = config.p_first
            bar.write(f"step {step}: {config.first_world} shapes read back {shape:.3f} (gate {config.gate})")
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        images, prompts = batch_at(step, config, pipe, first_share)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        x0 = pipe.patchify(images)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g)).to(device)  # logit-normal, as SD3
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = pipe.velocity(x_t, t, pipe.encode_prompt(prompts))
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in zip(pipe.modules(), ema, strict=True):
                for p, q in zip(m.parameters(), e.parameters(), strict=True):
                    q.lerp_(p, 1 - decay)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        if step % 10 == 0:
            state["log"].append((step, round(loss.item(), 5)))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if config.snapshot_every and done % config.snapshot_every == 0:
            ema_pipe.save(out / "snapshots" / f"{done:07d}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            state["step"], state["wall"] = done, wall_before + time.perf_counter() - began
            state["runs"][-1] |= {"end_step": done, "wall_seconds": round(time.perf_counter() - began, 1)}
            _save_checkpoint(checkpoint, pipe, ema, optimizer, model, config, state)

    trained = ShapesPipeline(ema[0], ema[1], pipe.tokenizer, model).eval()
    trained.save(out)
    (out / "train_log.json").write_text(json.dumps(train_log(checkpoint), indent=1))
    return trained


def train_log(checkpoint: str | Path) -> dict[str, Any]:
    """What a model card reports of a training: configurations, runs, gate readings, loss curve."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = state["train_config"]
    return {
        "model_config": state["model_config"],
        "train_config": config,
        "steps": state["step"],
        "images_seen": state["step"] * config["batch"],
        "wall_seconds": round(state["wall"], 1),
        "runs": state.get("runs", []),
        "gates": state.get("gates", []),
        "gate_step": state.get("gate_step"),
        "loss": state["log"],
    }


def _first_share(config: TrainConfig, state: dict[str, Any], step: int) -> float:
    """Share of the batch from the first world at ``step``: all of it until the gate, then ``p_first``."""
    if config.first_world is None:
        return 0.0
    gate_step = state["gate_step"]
    return 1.0 if gate_step is None or step < gate_step else config.p_first


def _gate_reading(pipe: ShapesPipeline, world: str) -> float:
    """Share of 64 sampled one-object images of ``world`` whose shape a readout reads back right."""
    from .evaluate import generation, train_readout

    readout, _ = train_readout(world=world)
    return float(generation(pipe, readout, n=64).shape_ok.mean())


def _hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def _save_checkpoint(path, pipe, ema, optimizer, model, config, state) -> None:
    full = {
        "modules": [m.state_dict() for m in pipe.modules()],
        "ema": [m.state_dict() for m in ema],
        "optimizer": optimizer.state_dict(),
        "model_config": asdict(model),
        "train_config": asdict(config),
        **state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(full, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
