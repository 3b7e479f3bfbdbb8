"""The embedded models: pixel patches, save/load, resumable training, and the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlens
from attnlens.datasets import shapesref
from attnlens.errors import UnsupportedModelError
from attnlens.testing import tiny_shapes_config
from attnlens.zoo.evaluate import grounding, otsu, summarise
from attnlens.zoo.shapes import ShapesPipeline
from attnlens.zoo.train import TrainConfig, train

TINY = tiny_shapes_config()
FAST = TrainConfig(steps=4, batch=4, checkpoint_every=2, warmup=2)


def test_patches_round_trip():
    pipe = ShapesPipeline.untrained(TINY)
    images = torch.randn(2, 3, 64, 64)
    tokens = pipe.patchify(images)
    assert tokens.shape == (2, 64, 192)
    assert torch.equal(pipe.unpatchify(tokens), images)
    # token (y, x) covers pixels [8y, 8y+8) × [8x, 8x+8): the grid positions attnlens reports
    assert torch.equal(tokens[0, 8 * 2 + 5].reshape(3, 8, 8), images[0, :, 16:24, 40:48])


def test_save_and_load_round_trip(tmp_path):
    pipe = ShapesPipeline.untrained(TINY, seed=3)
    pipe.save(tmp_path, dtype=torch.float32)
    again = ShapesPipeline.load(tmp_path)
    for a, b in zip(
        pipe.transformer.state_dict().values(), again.transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    assert np.array_equal(pipe("a red circle", 2, generator=g[0]), again("a red circle", 2, generator=g[1]))


def test_training_is_deterministic_and_resumes_to_the_same_weights(tmp_path):
    whole = train(tmp_path / "whole", TINY, FAST, device="cpu", progress=False)
    train(
        tmp_path / "split", TINY, TrainConfig(**{**FAST.__dict__, "steps": 2}), device="cpu", progress=False
    )
    resumed = train(tmp_path / "split", TINY, FAST, device="cpu", progress=False)
    for a, b in zip(whole.transformer.parameters(), resumed.transformer.parameters(), strict=True):
        assert torch.equal(a, b)
    log = json.loads((tmp_path / "whole" / "train_log.json").read_text())
    assert log["images_seen"] == 16 and log["loss"][0][0] == 0
    with pytest.raises(ValueError, match="another configuration"):
        train(
            tmp_path / "whole",
            TINY,
            TrainConfig(**{**FAST.__dict__, "lr": 0.5}),
            device="cpu",
            progress=False,
        )


def test_word_maps_are_captured_and_scored_against_baselines():
    pipe = ShapesPipeline.untrained(TINY)
    run = grounding(pipe, shapesref.expressions("test", 6), t=0.5)
    assert run.maps.dims == ("word_set", "sample", "layer", "y", "x")
    assert run.maps.shape[1:] == (6, 2, 64, 64)
    assert run.target.values.any((1, 2)).all()
    table = summarise(run, pipe.config.patch, "untrained", subsets=False)
    names = set(table.model)
    assert {"untrained", "whole image", "centre box", "colour lookup", "token-grid ceiling"} <= names
    ceiling = shapesref.baselines(run.pairs, 8)["token-grid ceiling"]
    assert ceiling.shape == run.target.shape
    # the ceiling is the target rounded to whole tokens: it covers most of the target and little else
    target = run.target.values
    assert (ceiling & target).sum() / target.sum() > 0.5 and (ceiling & ~target).sum() < target.sum()


def test_otsu_splits_two_levels():
    maps = np.zeros((2, 8, 8))
    maps[0, 2:4, 2:4] = 1.0
    masks = otsu(maps)
    assert masks[0].sum() == 4 and not masks[1].any()  # a constant map has no threshold


def test_capture_labels_the_embedded_pipeline_words():
    pipe = ShapesPipeline.untrained(TINY)
    with attnlens.capture(pipe, keep="cross") as cap:
        pipe("the red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    ds = cap.result
    assert list(ds.word.values[0, :3]) == ["the", "red", "circle"]
    assert list(ds.token_kind.values[0, :5]) == ["stop", "content", "content", "special", "pad"]
    assert ds.sizes["query"] == 64 and ds.y.values.max() == 7


def test_zoo_train_command_trains_and_resumes(tmp_path):
    from attnlens.cli import main

    args = ["zoo", "train", "shapes-flux", "--out", str(tmp_path), "--steps", "1", "--batch", "2"]
    assert main(args) == 0
    assert json.loads((tmp_path / "train_log.json").read_text())["steps"] == 1
    assert main([*args[:-4], "--steps", "2", "--batch", "2"]) == 0  # resumes from the checkpoint
    assert json.loads((tmp_path / "train_log.json").read_text())["images_seen"] == 4
    assert ShapesPipeline.load(tmp_path).config.num_layers == 3


# -- the shipped model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from attnlens import zoo

    folder = Path(zoo.__file__).parent / "shapes-flux"
    claims = json.loads((folder / "claims.json").read_text())
    bars = json.loads((folder / "bars.json").read_text())
    return zoo.load("shapes-flux"), claims, bars


def test_the_shipped_model_loads_offline_as_a_flux_transformer(shipped):
    from diffusers import FluxTransformer2DModel

    from attnlens import zoo

    pipe, _, _ = shipped
    assert "shapes-flux" in zoo.available()
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    with attnlens.capture(pipe, keep="cross") as cap:
        pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert cap.result.sizes["layer"] == pipe.config.num_layers + pipe.config.num_single_layers
    with pytest.raises(UnsupportedModelError, match="available: shapes-flux"):
        zoo.load("shapes-nothing")


def test_the_shipped_model_meets_what_its_card_claims_and_the_untrained_model_does_not(shipped):
    from attnlens.zoo.card import claims as measure_claims

    pipe, claimed, bars = shipped
    n, t, tolerance = claimed["subset"], claimed["t"], claimed["tolerance"]
    trained = measure_claims(pipe, t, n)
    untrained = measure_claims(ShapesPipeline.untrained(pipe.config, seed=1), t, n)
    for name, value in claimed["figures"].items():
        assert trained[name] == pytest.approx(value, abs=tolerance), name
    # every claimed figure is well above what random weights give
    for name in ("phrase mIoU", "colour pointing, colour unique"):
        assert untrained[name] < trained[name] - 0.1, name
    colour = next(b for b in bars if b["bar"].startswith("colour-word pointing"))
    if colour["met"]:
        assert trained["colour pointing, colour unique"] >= 0.9 - tolerance
        assert untrained["colour pointing, colour unique"] < 0.9 - tolerance
