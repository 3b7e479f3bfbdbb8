"""Grouping forwards into samples (runs), denoising steps and guidance branches, without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlens.errors import LayoutError
from attnlens.grouping import Grouping, Run, branch_groups
from attnlens.models.base import CallLayout

COND = [("cond", None)]


def _layout(t: float, batch: int = 1, n_text: int = 2, n_image: int = 4) -> CallLayout:
    return CallLayout.concatenated(batch, t, n_text, np.zeros((n_image, 3), dtype=np.int64))


def _grouping(**options) -> Grouping:
    return Grouping(lambda layout: Run(layout, [], []), **options)


def _feed(grouping: Grouping, *forwards) -> list[tuple[int, int, str]]:
    """``(run index, denoise step, branch)`` of each forward (``None`` where it is not captured)."""
    placed = []
    for layout, groups in forwards:
        found = grouping.forward(layout, groups)
        if found is None:
            placed.append(None)
            continue
        run, groups = found
        placed.append((grouping.runs.index(run), run.denoise_step, groups[0][0]))
    return placed


def test_a_sampler_pass_is_one_run_and_a_restart_another():
    grouping = _grouping()
    ts = (1000.0, 750.0, 500.0, 1000.0, 750.0)
    assert _feed(grouping, *((_layout(t), COND) for t in ts)) == [
        (0, 0, "cond"),
        (0, 1, "cond"),
        (0, 2, "cond"),
        (1, 0, "cond"),
        (1, 1, "cond"),
    ]


def test_guidance_calls_share_their_step():
    grouping = _grouping()
    forwards = [(_layout(t), [(b, None)]) for t in (1000.0, 500.0) for b in ("cond", "uncond")]
    assert _feed(grouping, *forwards) == [(0, 0, "cond"), (0, 0, "uncond"), (0, 1, "cond"), (0, 1, "uncond")]


def test_repeated_calls_batch_and_token_changes_start_new_runs():
    grouping = _grouping()
    placed = _feed(
        grouping,
        (_layout(1000.0), COND),
        (_layout(1000.0), COND),  # the same timestep and branch again: another sample
        (_layout(500.0, batch=2), COND),  # another batch
        (_layout(250.0, batch=2, n_image=6), COND),  # another grid
    )
    assert [p[0] for p in placed] == [0, 1, 2, 3]
    grouping.next_sample()
    assert _feed(grouping, (_layout(100.0, batch=2, n_image=6), COND))[0][0] == 4


def test_rising_timesteps_follow_the_direction_of_the_first_two_steps():
    grouping = _grouping(timesteps_may_rise=True)  # Mochi's inverted schedule: 0 → 1000
    placed = _feed(grouping, *((_layout(t), COND) for t in (0.0, 250.0, 500.0, 0.0, 250.0)))
    assert placed == [(0, 0, "cond"), (0, 1, "cond"), (0, 2, "cond"), (1, 0, "cond"), (1, 1, "cond")]
    falling = _grouping(timesteps_may_rise=True)
    assert [p[0] for p in _feed(falling, *((_layout(t), COND) for t in (900.0, 600.0, 700.0)))] == [0, 0, 1]


def test_consecutive_guidance_calls_without_cache_context_are_numbered_by_branch():
    grouping = _grouping(sequential_branches=("cond", "uncond"))  # Chroma: cond, then uncond, per step
    forwards = [(_layout(t), COND) for t in (1000.0, 1000.0, 500.0, 500.0)]
    assert _feed(grouping, *forwards) == [(0, 0, "cond"), (0, 0, "uncond"), (0, 1, "cond"), (0, 1, "uncond")]


def test_a_branch_over_other_tokens_is_not_captured_and_named():
    grouping = _grouping()
    with pytest.warns(UserWarning, match="the uncond forwards see 3 text tokens, the cond ones 2"):
        placed = _feed(grouping, (_layout(1000.0), COND), (_layout(1000.0, n_text=3), [("uncond", None)]))
    assert placed == [(0, 0, "cond"), None]


def test_batched_guidance_rows_split_into_branches_cond_first():
    groups = branch_groups(("uncond", "cond", "uncond", "cond"), "cond", 4)
    assert [(name, rows.tolist()) for name, rows in groups] == [("cond", [1, 3]), ("uncond", [0, 2])]
    grouping = _grouping()
    run, placed = grouping.forward(_layout(1000.0, batch=4), groups)
    assert run.layout.batch == 2 and [name for name, _ in placed] == ["cond", "uncond"]
    with pytest.raises(LayoutError, match="hold different numbers of rows"):
        branch_groups(("uncond", "cond", "cond"), "cond", 3)
    with pytest.raises(LayoutError, match="labelled 2 rows of a batch of 4"):
        branch_groups(("uncond", "cond"), "cond", 4)


def test_a_branch_keeps_the_text_mask_of_its_own_rows():
    mask = torch.tensor([[True, True], [True, False]])
    layout = CallLayout.concatenated(2, 1.0, 2, np.zeros((4, 3), dtype=np.int64), text_mask=mask)
    run, _ = _grouping().forward(layout, branch_groups(("uncond", "cond"), "cond", 2))
    assert run.layout.text_mask.tolist() == [[True, False]]
