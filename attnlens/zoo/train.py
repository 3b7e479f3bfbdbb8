"""Train a ShapesRef model with rectified flow: deterministic from a seed, resumable.

Step ``s`` always sees the same training scenes (indices ``s·batch … (s+1)·batch − 1`` of the
endless ``train`` split), the same text choices and the same noise, so an interrupted run
resumed from its last checkpoint ends where an uninterrupted run ends. Attention is never
supervised: the model only learns to generate images from text.

    attnlens zoo train shapes-flux --out runs/shapes-flux --steps 20000
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datasets import shapesref
from .shapes import ShapesConfig, ShapesPipeline

__all__ = ["TrainConfig", "train"]


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
        ema: decay of the exponential moving average whose weights are saved.
        checkpoint_every: steps between checkpoints.
        seed: fixes scenes, text choices, noise and initialisation.
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


def batch_at(step: int, config: TrainConfig, pipe: ShapesPipeline) -> tuple[torch.Tensor, list[str]]:
    """Images ``(batch, 3, H, W)`` in ``[-1, 1]`` and their prompts for training step ``step``."""
    rng = np.random.default_rng([config.seed, step])
    images, prompts = [], []
    for scene in shapesref.split("train", n=config.batch, start=step * config.batch):
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

    ``out`` receives ``checkpoint.pt`` every ``checkpoint_every`` steps, and at the end the
    EMA weights as ``config.json`` + ``model.safetensors`` plus ``train_log.json`` (loss curve,
    wall time, hardware).

    Returns:
        the trained pipeline (EMA weights).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model or ShapesConfig(vocab_size=len(shapesref.VOCAB))
    config = config or TrainConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = ShapesPipeline.untrained(model, seed=config.seed).to(device)
    params = [p for m in pipe.modules() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in pipe.modules()]
    start, log, wall = 0, [], 0.0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        # steps may change between runs (train longer, or stop early): the schedule does not depend on it
        same = {**state["train_config"], "steps": config.steps} == asdict(config)
        if state["model_config"] != asdict(model) or not same:
            raise ValueError(f"{checkpoint} was written with another configuration; use a new --out folder")
        for m, s in zip(pipe.modules(), state["modules"], strict=True):
            m.load_state_dict(s)
        for m, s in zip(ema, state["ema"], strict=True):
            m.load_state_dict(s)
        optimizer.load_state_dict(state["optimizer"])
        start, log, wall = state["step"], state["log"], state["wall"]
    for m in pipe.modules():
        m.train()

    start = min(start, config.steps)
    bar = tqdm(
        range(start, config.steps), initial=start, total=config.steps, desc="training", disable=not progress
    )
    began = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        images, prompts = batch_at(step, config, pipe)
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
        with torch.no_grad():
            for m, e in zip(pipe.modules(), ema, strict=True):
                for p, q in zip(m.parameters(), e.parameters(), strict=True):
                    q.lerp_(p, 1 - config.ema)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        if step % 10 == 0:
            log.append((step, round(loss.item(), 5)))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            elapsed = wall + time.perf_counter() - began
            _save_checkpoint(checkpoint, step + 1, pipe, ema, optimizer, model, config, log, elapsed)

    trained = ShapesPipeline(ema[0], ema[1], pipe.tokenizer, model).eval()
    trained.save(out)
    final = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.exists() else {}
    hardware = (
        torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    (out / "train_log.json").write_text(
        json.dumps(
            {
                "model_config": asdict(model),
                "train_config": asdict(config),
                "steps": config.steps,
                "images_seen": config.steps * config.batch,
                "wall_seconds": round(final.get("wall", wall), 1),
                "hardware": hardware,
                "loss": log,
            },
            indent=1,
        )
    )
    return trained


def _save_checkpoint(path, step, pipe, ema, optimizer, model, config, log, wall) -> None:
    state = {
        "step": step,
        "modules": [m.state_dict() for m in pipe.modules()],
        "ema": [m.state_dict() for m in ema],
        "optimizer": optimizer.state_dict(),
        "model_config": asdict(model),
        "train_config": asdict(config),
        "log": log,
        "wall": wall,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
