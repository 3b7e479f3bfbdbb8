"""Which sample, denoising step and guidance branch each transformer forward belongs to.

A sampler calls the transformer once per denoising step; classifier-free guidance adds a
second call per step (``cache_context("uncond")``, or consecutive calls without it) or doubles
the batch (``[uncond rows | cond rows]``). A bare model is called however its user likes.
:class:`Grouping` turns that stream of forwards into *runs*: the forwards of one pass of a
sampler over one batch, each batch row a sample. A forward starts a new run when

- the timestep moves against the sampler's direction (a new pass; FLUX and most samplers go
  1000 → 0, Mochi's inverted schedule 0 → 1000, so a run follows the direction of its first
  two steps when the adapter says timesteps may rise);
- the same timestep and branch come again (repeated bare calls);
- the batch or the token layout changes;
- the user asked for one (:meth:`Grouping.next_sample`).

Another branch of the same step over other tokens (Qwen-Image's shorter negative prompt) is
not captured: one Dataset holds one token layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .errors import LayoutError
from .models.base import CallLayout
from .schema import CapturedStep
from .text import TokenLabels

__all__ = ["Grouping", "Run", "branch_groups", "rows_of"]

#: a forward's batch rows per branch: ``[(branch, rows or None for all)]``, cond first
Branches = list[tuple[str, torch.Tensor | None]]


@dataclass(eq=False)  # a run is itself: two runs over the same layout are two samples
class Run:
    """Forwards that belong together: one pass of a sampler (or one bare call) over a batch.

    Attributes:
        layout: the layout of one branch's rows (``batch`` = samples).
        labels: token labels, one per sample.
        prompts: the prompt of each sample (``""`` where unknown).
        steps: the captured steps, in order.
        ids: sample ids named by ``with cap.sample(...)``.
        stored: whether the run was handed to a store.
        paths: ``(variable, path)`` of each normaliser used (``("lse", "kernel:…")``, …).
    """

    layout: CallLayout
    labels: list[TokenLabels]
    prompts: list[str]
    steps: list[CapturedStep] = field(default_factory=list)
    ids: list[str] | None = None
    stored: bool = False
    paths: set[tuple[str, str]] = field(default_factory=set)
    seen: set[tuple[float, str]] = field(default_factory=set)
    last_timestep: float = float("inf")
    denoise_step: int = -1
    direction: int = 0  # sign of the timestep's change along the run, once it has moved


class Grouping:
    """Assigns forwards to runs and denoising steps.

    Args:
        start: makes the run a forward starts, from the layout of one branch's rows.
        timesteps_may_rise: whether a sampler pass may feed rising timesteps.
        sequential_branches: branch names of consecutive calls at one timestep when a pipeline
            runs guidance without ``cache_context`` (Chroma: ``("cond", "uncond")``).

    >>> import numpy as np
    >>> grid = np.zeros((4, 3), dtype=np.int64)
    >>> grouping = Grouping(lambda layout: Run(layout, [], []))
    >>> for t in (1000.0, 500.0, 1000.0):  # a pass of two steps, then a restart
    ...     run, _ = grouping.forward(CallLayout.concatenated(1, t, 2, grid), [("cond", None)])
    ...     print(len(grouping.runs), run.denoise_step)
    1 0
    1 1
    2 0
    """

    def __init__(
        self,
        start: Callable[[CallLayout], Run],
        *,
        timesteps_may_rise: bool = False,
        sequential_branches: tuple[str, ...] = (),
    ) -> None:
        self.start = start
        self.timesteps_may_rise = timesteps_may_rise
        self.sequential_branches = sequential_branches
        self.runs: list[Run] = []
        self._new = False

    def next_sample(self) -> None:
        """Start a new run at the next forward, even if its timestep would continue the last one."""
        self._new = True

    def forward(self, layout: CallLayout, groups: Branches) -> tuple[Run, Branches] | None:
        """The run of one forward and its branches (rows), or ``None`` when it is not captured.

        Advances the run's denoising step when the timestep moved.
        """
        t = layout.timestep
        run = self.runs[-1] if self.runs else None
        if len(groups) == 1 and self.sequential_branches and run and (t, groups[0][0]) in run.seen:
            # guidance as consecutive calls without cache_context: the k-th call at a timestep is branch k
            free = [b for b in self.sequential_branches if (t, b) not in run.seen]
            if free and t == run.last_timestep:
                groups = [(free[0], None)]
        samples = layout.batch // len(groups)
        keys = [(t, name) for name, _ in groups]
        if (
            run is not None
            and not self._new
            and t == run.last_timestep
            and not any(key in run.seen for key in keys)
            and not run.layout.same_tokens(layout)
        ):
            first = ", ".join(sorted({b for seen_t, b in run.seen if seen_t == t}))
            warnings.warn(
                f"the {', '.join(name for name, _ in groups)} forwards see {len(layout.text)} text tokens, "
                f"the {first} ones {len(run.layout.text)}: they are not captured (a Dataset holds one token "
                "layout); give the negative prompt the same token count to capture both",
                stacklevel=3,
            )
            return None
        if (
            run is None
            or self._new
            or run.layout.batch != samples
            or not run.layout.same_tokens(layout)
            or self._restarted(run, t)
            or any(key in run.seen for key in keys)
        ):
            self._new = False
            run = self.start(rows_of(layout, groups[0][1], samples))
            self.runs.append(run)
        if t != run.last_timestep:
            if run.denoise_step >= 0 and not run.direction:
                run.direction = 1 if t > run.last_timestep else -1
            run.denoise_step += 1
            run.last_timestep = t
        run.seen.update(keys)
        return run, groups

    def _restarted(self, run: Run, timestep: float) -> bool:
        """Whether ``timestep`` cannot continue ``run``: it moves against the sampler's direction."""
        if not self.timesteps_may_rise:
            return timestep > run.last_timestep
        if run.denoise_step < 0 or not run.direction or timestep == run.last_timestep:
            return False
        return (timestep > run.last_timestep) != (run.direction > 0)


def branch_groups(rows: tuple[str, ...] | None, branch: str, batch: int) -> Branches:
    """Split a forward's batch rows by guidance branch, cond first.

    ``rows`` names the branch of each row (an adapter's ``branches``), ``None`` when every
    row belongs to ``branch`` (the one the hooks report).

    >>> groups = branch_groups(("uncond", "uncond", "cond", "cond"), "cond", 4)
    >>> {name: rows.tolist() for name, rows in groups}  # cond first
    {'cond': [2, 3], 'uncond': [0, 1]}
    >>> branch_groups(None, "uncond", 2)
    [('uncond', None)]
    """
    if rows is None or len(set(rows)) == 1:
        return [(rows[0] if rows else branch, None)]
    if len(rows) != batch:
        raise LayoutError(f"an adapter labelled {len(rows)} rows of a batch of {batch}")
    names = sorted(dict.fromkeys(rows), key=lambda name: name != "cond")
    groups = [(name, torch.tensor([i for i, r in enumerate(rows) if r == name])) for name in names]
    if len({len(g[1]) for g in groups}) != 1:
        raise LayoutError(f"CFG branches {names} hold different numbers of rows: {list(rows)}")
    return groups


def rows_of(layout: CallLayout, rows: torch.Tensor | None, samples: int) -> CallLayout:
    """The layout of some rows (``samples`` of them) of a forward; ``None``: all rows."""
    if rows is None:
        return layout
    mask = layout.text_mask
    if mask is not None:
        mask = mask.index_select(0, rows.to(mask.device))
    return replace(layout, batch=samples, text_mask=mask)
