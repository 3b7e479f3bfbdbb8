"""RefAM: parsing, prompts with magnets, and segment() end to end on tiny FLUX and ShapesRef models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import attnlens
from attnlens import refam
from attnlens.datasets import shapesref
from attnlens.errors import AttnlensError, HookError, UnsupportedModelError
from attnlens.refam import image as refam_image
from attnlens.refam.image import _filter_sinks
from attnlens.refam.refine import image_segmenter
from attnlens.testing import tiny_flux_pipeline, tiny_sam2, tiny_shapes_pipeline, tiny_t5_tokenizer
from attnlens.text import TruncationWarning

EXPRESSION = "the red circle on the left"


@pytest.fixture(scope="module")
def shapes():
    return tiny_shapes_pipeline()


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline(num_layers=1, num_single_layers=1)


@pytest.fixture(scope="module")
def scene():
    return shapesref.make_scene(np.random.default_rng(0), n_objects=2).image  # (64, 64, 3) uint8


@pytest.fixture(scope="module")
def odd():
    return (np.random.default_rng(1).random((880, 1184, 3)) * 255).astype(np.uint8)


# -- parsing -----------------------------------------------------------------------------------------

PARSES = [
    # expression, head, phrase, directions
    ("The small red mug on the left", "mug", ("small", "red", "mug"), ("left",)),
    ("the man in red on the right", "man", ("man",), ("right",)),
    ("a cat sitting next to the blue cup", "cat", ("cat",), ()),
    ("the bottom shelf", "shelf", ("bottom", "shelf"), ("bottom",)),
    ("large green triangle at the top", "triangle", ("large", "green", "triangle"), ("top",)),
    ("dog", "dog", ("dog",), ()),
    ("the leftmost car, closest to the camera", "car", ("leftmost", "car"), ("left", "near")),
    ("middle tree with white flowers", "tree", ("middle", "tree"), ("middle",)),
    ("the red-haired girl", "girl", ("red-haired", "girl"), ()),
]


@pytest.mark.parametrize(("expression", "head", "phrase", "directions"), PARSES)
def test_rule_parser(expression, head, phrase, directions):
    p = refam.parse(expression, parser="rules")
    assert (p.head, p.phrase, p.directions, p.parser) == (head, phrase, directions, "rules")
    assert p.head not in p.modifiers


@pytest.mark.parametrize("expression", ["", "   ", "?!", None, 3])
def test_empty_expressions_are_refused(expression):
    with pytest.raises(refam.EmptyExpressionError, match="expression"):
        refam.parse(expression, parser="rules")


@pytest.mark.parametrize("expression", ["on the left", "the red one", "the second from the top"])
def test_expressions_without_a_noun_are_refused(expression):
    with pytest.raises(refam.NoNounError, match="no noun"):
        refam.parse(expression, parser="rules")


def test_unknown_parser_and_missing_spacy():
    with pytest.raises(ValueError, match="unknown parser"):
        refam.parse("the mug", parser="nltk")
    if refam.parse("the mug").parser == "rules":  # spaCy's model is not installed here
        with pytest.raises(ImportError, match="spaCy"):
            refam.parse("the mug", parser="spacy")


# -- prompts -----------------------------------------------------------------------------------------


def test_magnets_are_appended_and_located():
    tok = tiny_t5_tokenizer()
    p = refam.build_prompt("the red mug on the left", tok, max_length=16)
    assert p.text == "the red mug on the left the of and white"
    assert p.magnets == ("the", "of", "and", "white")
    assert [p.labels.token_str[i] for i in p.target] == ["▁mug"]
    assert p.magnet.tolist() == [6, 7, 8, 9]
    assert set(p.labels.token_kind[p.magnet]) == {"magnet"}
    assert p.text[p.expression_span[0] : p.expression_span[1]] == "the red mug on the left"
    # the expression's own "the" is a stop word, not a magnet
    assert p.labels.token_kind[0] == "stop"


def test_prompt_variants():
    tok = tiny_t5_tokenizer(model_max_length=24)
    bare = refam.build_prompt("the white cat", tok, max_length=24, append=False)
    assert (bare.text, bare.magnets, bare.magnet.size) == ("the white cat", (), 0)
    swapped = refam.build_prompt("the white cat", tok, max_length=24, magnets=["a"])
    assert swapped.magnets == ("a", "black")  # the colour magnet is never a word of the expression
    phrase = refam.build_prompt("the small red cup", tok, max_length=24, targets="phrase", colour=None)
    assert [phrase.labels.word[i] for i in phrase.target] == ["small", "red", "cup"]
    captioned = refam.build_prompt("the cat", tok, max_length=24, caption="a photo of {expression} by a tree")
    assert captioned.text.startswith("a photo of the cat by a tree ")
    assert [captioned.labels.word[i] for i in captioned.target] == ["cat"]
    assert refam.compose("the cat", caption="a photo", magnets=()) == (
        "a photo, the cat white",
        (9, 16),
        17,
        ("white",),
    )
    with pytest.raises(refam.RefamError, match="max_length"), pytest.warns(TruncationWarning):
        refam.build_prompt(
            "the cat", tok, max_length=4, caption="a photo of a dog and a big old tree by {expression}"
        )
    with pytest.raises(ValueError, match="targets"):
        refam.build_prompt("the cat", tok, max_length=24, targets="all")


# -- segment: end to end -----------------------------------------------------------------------------


def test_flux_end_to_end(flux_pipe, odd):
    r = refam.segment(odd, "the red mug on the left", model=flux_pipe, resolution=32, negatives=1)
    assert r.mask.shape == r.heatmap.shape == (880, 1184)
    assert r.mask.dtype == bool and r.heatmap.dtype == np.float32
    assert r.mask.any() and not r.mask.all()
    assert r.heatmap.min() >= 0.0 and r.heatmap.max() <= 1.0
    assert r.points.shape == (2, 2) and r.point_labels.tolist() == [1, 0]
    assert (r.points >= 0).all() and (r.points[:, 0] <= 1184).all() and (r.points[:, 1] <= 880).all()
    assert r.maps["target"].dims == ("layer", "y", "x")
    assert list(r.maps.layer.values) == ["double.0", "single.0"]
    assert r.maps["heatmap"].shape == (8, 8)  # 32 px → 16 × 16 latents → 8 × 8 tokens
    assert r.info["resolution"] == 32 and r.info["gas_applied"].startswith(("suppress", "none"))
    assert r.options["t"] == 0.5 and r.options["gas"] == "suppress"
    assert r.expression.head == "mug" and r.prompt.magnets == ("the", "of", "and", "white")
    # the prior of "left": the heatmap's right edge is damped to the prior's floor, not zeroed
    np.testing.assert_allclose(r.maps["prior"][:, -1], 0.1)
    assert float(r.maps["prior"].min()) == pytest.approx(0.1) and float(r.maps["prior"].max()) == 1.0
    again = refam.segment(odd, "the red mug on the left", model=flux_pipe, resolution=32, negatives=1)
    assert np.array_equal(again.mask, r.mask) and np.array_equal(again.heatmap, r.heatmap)
    other = refam.segment(odd, "the red mug on the left", model=flux_pipe, resolution=32, seed=1)
    assert not np.array_equal(other.heatmap, r.heatmap)


def test_flux_gas_interventions_change_the_maps(flux_pipe, odd):
    def run(**kw):
        return refam.segment(odd, "the cat", model=flux_pipe, resolution=32, spatial_prior=False, **kw)

    plain = run(gas="none")
    suppressed = run(gas="suppress", sinks={"kind": "pad"})
    redirected = run(gas="redirect", sinks={"kind": "pad"})
    assert (plain.info["gas_applied"], suppressed.info["gas_applied"]) == ("none", "suppress")
    assert redirected.info["gas_applied"] == "redirect"
    a, b, c = (r.maps["aggregate"].values for r in (plain, suppressed, redirected))
    assert not np.allclose(a, b) and not np.allclose(b, c) and not np.allclose(a, c)


def test_shapes_end_to_end_and_deterministic(shapes, scene):
    r = refam.segment(scene, EXPRESSION, model=shapes)
    assert r.mask.shape == (64, 64) and r.info["resolution"] == 64 and r.maps["heatmap"].shape == (8, 8)
    assert r.points.shape == (1, 2) and r.point_labels.tolist() == [1]
    assert ndimage.label(r.mask)[1] == 1  # the refiner keeps one connected component
    again = refam.segment(scene, EXPRESSION, model=shapes)
    assert np.array_equal(r.mask, again.mask) and np.array_equal(r.heatmap, again.heatmap)
    two = refam.segment(scene, EXPRESSION, model=shapes, forwards=2)
    assert not np.allclose(two.maps["aggregate"].values, r.maps["aggregate"].values)


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.full((88, 118), 200, dtype=np.uint8), id="grey"),
        pytest.param(np.zeros((88, 118, 4), dtype=np.uint8) + 90, id="rgba"),
        pytest.param(Image.new("LA", (118, 88), (40, 255)), id="pil-la"),
        pytest.param(np.random.default_rng(2).random((3, 5, 1)), id="tiny-float"),
        pytest.param(np.zeros((900, 1300, 3), dtype=np.uint8), id="large"),
    ],
)
def test_any_image_size_and_mode(shapes, image):
    r = refam.segment(image, EXPRESSION, model=shapes)
    size = (image.size[1], image.size[0]) if isinstance(image, Image.Image) else image.shape[:2]
    assert r.mask.shape == r.heatmap.shape == size
    assert r.mask.any()  # never a silent empty mask, even on a blank image


def test_bad_images_are_refused(shapes):
    with pytest.raises(refam.RefamError, match="image"):
        refam.segment(np.zeros((0, 4, 3), dtype=np.uint8), EXPRESSION, model=shapes)
    with pytest.raises(refam.RefamError, match="image"):
        refam.segment(np.zeros((4, 4, 2), dtype=np.uint8), EXPRESSION, model=shapes)
    with pytest.raises(refam.RefamError, match="NaN"):
        refam.segment(np.full((4, 4), np.nan), EXPRESSION, model=shapes)
    with pytest.raises(refam.RefamError, match="resolution"):
        refam.segment(np.zeros((4, 4), dtype=np.uint8), EXPRESSION, model=shapes, resolution=32)


# -- ablations ---------------------------------------------------------------------------------------


def test_ablation_no_appended_magnets(shapes, scene):
    full = refam.segment(scene, EXPRESSION, model=shapes)
    bare = refam.segment(scene, EXPRESSION, model=shapes, append_magnets=False)
    assert full.prompt.magnet.size == 4 and "magnet" in full.maps
    assert bare.prompt.magnet.size == 0 and bare.prompt.text == EXPRESSION and "magnet" not in bare.maps
    assert not np.allclose(full.maps["aggregate"].values, bare.maps["aggregate"].values)


def test_ablation_no_magnet_filtering(shapes, scene):
    full = refam.segment(scene, EXPRESSION, model=shapes)
    unfiltered = refam.segment(scene, EXPRESSION, model=shapes, filter_magnets=False)
    assert full.maps.attrs["aggregated_positions"] == full.prompt.target.tolist()
    kinds = unfiltered.prompt.labels.token_kind
    extra = set(unfiltered.maps.attrs["aggregated_positions"]) - set(full.prompt.target.tolist())
    assert set(full.prompt.magnet.tolist()) <= extra and {kinds[i] for i in extra} == {"stop", "magnet"}
    assert not np.allclose(full.maps["aggregate"].values, unfiltered.maps["aggregate"].values)
    # the same forward: only the aggregation differs
    np.testing.assert_array_equal(full.maps["magnet"].values, unfiltered.maps["magnet"].values)


def test_ablation_no_gas_handling(shapes, scene):
    handled = refam.segment(scene, EXPRESSION, model=shapes, sinks={"kind": "pad"})
    ablated = refam.segment(scene, EXPRESSION, model=shapes, sinks={"kind": "pad"}, gas="none")
    assert handled.info["gas_applied"] == "suppress" and ablated.info["gas_applied"] == "none"
    assert not np.allclose(handled.maps["aggregate"].values, ablated.maps["aggregate"].values)
    auto = refam.segment(scene, EXPRESSION, model=shapes)  # find_sinks on a probe forward
    assert isinstance(auto.info["sinks"], list) and isinstance(auto.info["sink_layers"], list)


def test_ablation_no_refinement(shapes, scene):
    refined = refam.segment(scene, EXPRESSION, model=shapes)
    raw = refam.segment(scene, EXPRESSION, model=shapes, refine=False)
    np.testing.assert_array_equal(raw.heatmap, refined.heatmap)
    np.testing.assert_array_equal(raw.mask, raw.heatmap >= refam.otsu_threshold(raw.heatmap))
    assert (refined.mask <= raw.mask).all()  # a component of the thresholded map
    assert raw.info["refiner"] == "threshold only"
    peak = refam.segment(scene, EXPRESSION, model=shapes, component="peak")
    x, y = peak.points[0].astype(int)
    assert peak.mask[y, x]


def test_spatial_prior_switch(shapes, scene):
    with_prior = refam.segment(scene, EXPRESSION, model=shapes)
    without = refam.segment(scene, EXPRESSION, model=shapes, spatial_prior=False)
    hard = refam.segment(scene, EXPRESSION, model=shapes, prior_floor=0.0)
    assert float(without.maps["prior"].min()) == 1.0 and float(hard.maps["prior"][:, -1].max()) == 0.0
    np.testing.assert_array_equal(with_prior.maps["aggregate"].values, without.maps["aggregate"].values)
    assert not np.array_equal(with_prior.heatmap, without.heatmap)
    assert not np.array_equal(with_prior.heatmap, hard.heatmap)


def test_spatial_prior_and_otsu():
    np.testing.assert_allclose(refam.spatial_prior(["right"], (1, 4), extent=1.0), [[0, 1 / 3, 2 / 3, 1]])
    middle = refam.spatial_prior(["middle"], (5, 5))
    assert (middle[:, 2] == 1.0).all() and (middle[:, 0] == 0.0).all() and 0 < middle[0, 1] < 1
    assert (refam.spatial_prior(["near"], (3, 3)) == 1).all()  # depth gives no prior
    assert refam.otsu_threshold(np.ones((3, 3))) == 1.0
    values = np.r_[np.zeros(50), np.ones(10)]
    assert (values >= refam.otsu_threshold(values)).sum() == 10


def test_spatial_prior_floor():
    """The prior is ``floor + (1 − floor) · ramp``: the far side is damped, never ruled out."""
    np.testing.assert_allclose(
        refam.spatial_prior(["left"], (1, 4), extent=1.0, floor=0.1), [[1.0, 0.7, 0.4, 0.1]]
    )
    np.testing.assert_allclose(refam.spatial_prior(["left"], (1, 4), extent=1.0), [[1, 2 / 3, 1 / 3, 0]])
    for direction in ("left", "right", "top", "bottom", "middle"):
        prior = refam.spatial_prior([direction, "left"], (6, 6), floor=0.1)  # products too: floor once
        assert prior.min() == pytest.approx(0.1) and prior.max() <= 1.0
    # an object on the "wrong" side wins when its attention is ten times stronger than that on the right side
    attention = np.array([[0.05, 0.0, 0.0, 1.0]])
    floored = attention * refam.spatial_prior(["left"], (1, 4), extent=1.0, floor=0.1)
    hard = attention * refam.spatial_prior(["left"], (1, 4), extent=1.0)
    assert (int(floored.argmax()), int(hard.argmax())) == (3, 0)
    assert refam.RefamOptions().prior_floor == 0.1


@pytest.mark.parametrize("floor", [1.0, -0.1, 1.5, float("nan")])
def test_bad_prior_floors_are_refused(floor):
    with pytest.raises(ValueError, match=r"prior_floor=.* must lie in \[0, 1\)"):
        refam.RefamOptions(prior_floor=floor)
    with pytest.raises(ValueError, match=r"floor=.* must lie in \[0, 1\)"):
        refam.spatial_prior(["left"], (2, 2), floor=floor)


def test_default_prior_has_no_zero_region(shapes, scene):
    for expression in (EXPRESSION, "the blue square at the top right", "the middle triangle"):
        r = refam.segment(scene, expression, model=shapes)
        assert r.expression.directions, expression
        prior = r.maps["prior"].values
        assert (prior > 0).all() and prior.min() == pytest.approx(0.1), expression


# -- text share --------------------------------------------------------------------------------------


@pytest.fixture
def aggregated(monkeypatch):
    """The ``cross`` rows ``(layer, query, key_text)`` that each segment() call hands to step 5."""
    seen = []
    real = refam_image._aggregate

    def spy(cross, *args):
        seen.append(cross.copy())
        return real(cross, *args)

    monkeypatch.setattr(refam_image, "_aggregate", spy)
    return seen


def test_text_share_rows_are_distributions_over_the_text_keys(shapes, scene, aggregated):
    raw = refam.segment(scene, EXPRESSION, model=shapes)
    shared = refam.segment(scene, EXPRESSION, model=shapes, text_share=True)
    raw_rows, shared_rows = aggregated
    assert (
        raw_rows.sum(axis=-1) < 0.99
    ).all()  # raw rows: the rest of each query's attention is on image keys
    np.testing.assert_allclose(shared_rows.sum(axis=-1), 1.0)
    # the share is the raw row over its text sum, per layer (one forward here)
    np.testing.assert_allclose(shared_rows, raw_rows / raw_rows.sum(axis=-1, keepdims=True))
    assert not np.allclose(shared.heatmap, raw.heatmap)
    assert not np.allclose(shared.maps["aggregate"].values, raw.maps["aggregate"].values)
    # the magnets' map gets the same treatment: target and magnets share one distribution per query
    total = shared.maps["target"].mean("layer") + shared.maps["magnet"]
    assert float(total.max()) <= 1.0 + 1e-9 and float(shared.maps["magnet"].max()) > float(
        raw.maps["magnet"].max()
    )


def test_text_share_after_post_hoc_sink_filtering(shapes, scene, aggregated, monkeypatch):
    """Where the adapter cannot intervene, the share is taken over the text keys the filter leaves."""
    _cannot_intervene(monkeypatch)
    r = refam.segment(scene, EXPRESSION, model=shapes, sinks={"kind": "pad"}, text_share=True, forwards=2)
    assert r.info["gas_applied"] == "filter"
    (rows,) = aggregated
    pad = r.prompt.labels.token_kind == "pad"
    assert pad.any() and (rows[..., pad] == 0).all()
    np.testing.assert_allclose(rows.sum(axis=-1), 1.0)


# -- GAS never takes the target's own tokens ---------------------------------------------------------


def _cannot_intervene(monkeypatch):
    """Make attnlens.capture refuse interventions, as an adapter that cannot intervene does."""
    real = attnlens.capture

    def capture(model, intervene=None, **kwargs):
        if intervene is not None:
            raise HookError("this test's adapter cannot intervene")
        return real(model, **kwargs)

    monkeypatch.setattr(attnlens, "capture", capture)


def _gas_on_the_target(monkeypatch):
    """The automatic sink finder names the target token (in every layer), beside what it finds."""
    real = refam_image._find_gas

    def find_gas(backend, pixels, prompt, options):
        positions, _, text = real(backend, pixels, prompt, options)
        return sorted({*positions, int(text[prompt.target[0]])}), ["double.0", "single.0"], text

    monkeypatch.setattr(refam_image, "_find_gas", find_gas)


@pytest.mark.parametrize("intervenes", [True, False], ids=["suppress", "filter"])
def test_gas_handling_spares_the_target_tokens(shapes, scene, monkeypatch, intervenes):
    _gas_on_the_target(monkeypatch)
    if not intervenes:
        _cannot_intervene(monkeypatch)
    spared = refam.segment(scene, EXPRESSION, model=shapes)  # gas_spare_targets=True by default
    ablated = refam.segment(scene, EXPRESSION, model=shapes, gas_spare_targets=False)
    target = int(spared.prompt.target[0])  # text position; the text comes first in the ShapesPipeline
    assert spared.info["spared_sinks"] == [target] and target not in spared.info["sinks"]
    assert ablated.info["spared_sinks"] == [] and target in ablated.info["sinks"]
    assert ablated.info["gas_applied"] == ("suppress" if intervenes else "filter")
    # the spared target keeps its column in every layer; the ablation suppresses it (or drops it)
    assert (spared.maps["target"].values > 0).all()
    np.testing.assert_array_equal(ablated.maps["target"].values, 0.0)
    assert spared.maps.attrs["aggregated_positions"] == ablated.maps.attrs["aggregated_positions"] == [target]


def test_sink_columns_filtered_post_hoc():
    """Where the adapter cannot intervene, sink text columns are dropped and each row renormalised."""
    rng = np.random.default_rng(0)
    cross = rng.random((2, 6, 4)) * 0.2  # (layer, query, key_text): rows sum below 1, the rest on images
    labels = attnlens.TokenLabels.unknown(4)
    select = attnlens.suppress(positions=[3]).select
    out = _filter_sinks(cross, select, labels)
    assert (out[..., 3] == 0).all()
    np.testing.assert_allclose(out[..., :3], cross[..., :3] / (1 - cross[..., 3:]))


# -- segmenters --------------------------------------------------------------------------------------


def _tiny_sam():
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(
        hidden_size=16,
        output_channels=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        mlp_dim=16,
        global_attn_indexes=[0],
        window_size=2,
        num_pos_feats=8,
    )
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16, iou_head_hidden_dim=8
    )
    torch.manual_seed(0)
    model = SamModel(
        SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    )
    processor = SamProcessor(
        image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    )
    return model.eval(), processor, SamImageProcessor


def _tiny_sam2():
    """A tiny random ``(Sam2Model, Sam2Processor)`` taking 64 × 64 images (see attnlens.testing.tiny_sam2)."""
    return tiny_sam2(side=64)


def test_tiny_sam2_segmenter(flux_pipe, odd):
    import torch

    model, processor = _tiny_sam2()
    r = refam.segment(odd, "the red circle", model=flux_pipe, resolution=32, segmenter=(model, processor))
    assert r.mask.shape == (880, 1184) and r.mask.dtype == bool and r.mask.any()
    assert r.info["refiner"] == "segmenter"
    # the contract: SAM2 prompted with the points; the best-scoring of its 3 candidates, at the input size
    inputs = processor(
        images=Image.fromarray(odd),
        input_points=[[r.points.tolist()]],
        input_labels=[[r.point_labels.tolist()]],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**inputs, multimask_output=True)
    candidates = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][0]
    assert len(candidates) == 3
    assert np.array_equal(r.mask, candidates[int(out.iou_scores[0, 0].argmax())].numpy())
    again = refam.segment(odd, "the red circle", model=flux_pipe, resolution=32, segmenter=(model, processor))
    assert np.array_equal(r.mask, again.mask)


def test_mismatched_sam2_segmenters_are_refused(shapes, scene):
    sam, sam_processor, _ = _tiny_sam()
    sam2, sam2_processor = _tiny_sam2()
    _, other_size = tiny_sam2(side=96)  # resizes to 96 × 96; the model takes 64 × 64
    video_model, video_processor = tiny_sam2(video=True)
    for segmenter in [
        (sam2, sam_processor),
        (sam, sam2_processor),
        (sam2, other_size),
        (video_model, video_processor),  # a video segmenter: refam.segment_video takes it
        (sam2, video_processor),
    ]:
        with pytest.raises(refam.SegmenterMismatchError):
            refam.segment(scene, EXPRESSION, model=shapes, segmenter=segmenter)


def test_tiny_sam_segmenter(shapes, odd):
    model, processor, _ = _tiny_sam()
    r = refam.segment(odd, EXPRESSION, model=shapes, segmenter=(model, processor), negatives=1)
    assert r.mask.shape == (880, 1184) and r.mask.dtype == bool and r.mask.any()
    assert r.info["refiner"].startswith("segmenter")
    again = refam.segment(odd, EXPRESSION, model=shapes, segmenter=(model, processor), negatives=1)
    assert np.array_equal(r.mask, again.mask)


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_a_grid_of_prompts_encodes_the_image_once(shapes, scene, family):
    from unittest import mock

    model, processor = _tiny_sam()[:2] if family == "sam" else _tiny_sam2()
    with mock.patch.object(model, "get_image_embeddings", wraps=model.get_image_embeddings) as encode:
        r = refam.segment(scene, EXPRESSION, model=shapes, segmenter=(model, processor), prompts="grid")
    assert encode.call_count == 1 and r.mask.shape == (64, 64) and len(r.points) == 1
    fresh = image_segmenter((model, processor))  # one that never saw the image, prompted at that point
    np.testing.assert_array_equal(fresh(scene, r.points, r.point_labels), r.mask)


def test_callable_segmenter_gets_the_points(shapes, odd):
    seen = {}

    def fake(image, points, labels):
        seen.update(shape=image.shape, points=points.copy(), labels=labels.copy())
        mask = np.zeros(image.shape[:2], dtype=bool)
        x, y = points[0].astype(int)
        mask[y, x] = True
        return mask

    r = refam.segment(odd, EXPRESSION, model=shapes, segmenter=fake, negatives=2)
    assert seen["shape"] == (880, 1184, 3) and seen["labels"].tolist() == [1, 0, 0]
    np.testing.assert_array_equal(seen["points"], r.points)
    assert r.mask.sum() == 1 and r.info["refiner"] == "segmenter"


def test_region_refiner_takes_the_flat_colour_region_under_the_point(shapes, scene):
    r = refam.segment(scene, EXPRESSION, model=shapes, refiner="region")
    x, y = r.points[0].astype(int)
    assert r.mask[y, x] and r.info["refiner"] == "segmenter"
    difference = np.abs(scene[r.mask].astype(int) - scene[y, x].astype(int)).max()
    assert difference <= 24  # the default tolerance: every pixel of the mask is the point's colour
    assert not np.array_equal(refam.segment(scene, EXPRESSION, model=shapes).mask, r.mask)


def test_a_grid_of_prompts_keeps_the_segment_with_most_heat(shapes, scene):
    r = refam.segment(scene, EXPRESSION, model=shapes, refiner="region", prompts="grid")
    peak = refam.segment(scene, EXPRESSION, model=shapes, refiner="region")
    np.testing.assert_array_equal(r.heatmap, peak.heatmap)
    assert len(r.points) == 1 and r.point_labels.tolist() == [1]
    gy, gx = r.maps["heatmap"].shape
    segment = refam.region_segmenter()
    means = [
        r.heatmap[segment(scene, np.array([[(c + 0.5) * 64 / gx, (row + 0.5) * 64 / gy]]), np.ones(1))].mean()
        for row in range(gy)
        for c in range(gx)
    ]
    assert r.heatmap[r.mask].mean() == pytest.approx(max(means))
    assert max(means) >= peak.heatmap[peak.mask].mean()  # the peak's own segment was one of the proposals
    with pytest.raises(refam.SegmenterMismatchError, match="threshold refiner takes no points"):
        refam.segment(scene, EXPRESSION, model=shapes, prompts="grid")


def test_mismatched_segmenters_are_refused(shapes, scene):
    model, processor, image_processor = _tiny_sam()
    cases = [
        model,  # no processor
        (processor, model),
        (model, processor.__class__(image_processor=image_processor())),  # pads to 1024, model takes 64
        "sam",
        lambda image, points, labels: np.ones((3, 3), dtype=bool),  # a mask of the wrong size
    ]
    for segmenter in cases:
        with pytest.raises(refam.SegmenterMismatchError):
            refam.segment(scene, EXPRESSION, model=shapes, segmenter=segmenter)


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(shapes, scene):
    with pytest.raises(refam.EmptyExpressionError):
        refam.segment(scene, "  ", model=shapes)
    with pytest.raises(refam.NoNounError):
        refam.segment(scene, "the one on the left", model=shapes, parser="rules")
    with pytest.raises(UnsupportedModelError, match="no embedded model 'nope'"):
        refam.segment(scene, EXPRESSION, model="nope")
    with pytest.raises(UnsupportedModelError, match="Qwen-Image"):
        refam.segment(scene, EXPRESSION, model=object())
    with pytest.raises(TypeError, match="unknown RefAM option"):
        refam.segment(scene, EXPRESSION, model=shapes, threshold=0.3)
    with pytest.raises(ValueError, match="gas"):
        refam.segment(scene, EXPRESSION, model=shapes, gas="drop")
    with pytest.raises(ValueError, match="flow time"):
        refam.segment(scene, EXPRESSION, model=shapes, t=1.5)
    with pytest.raises(ValueError, match="unknown refiner='sam'"):
        refam.segment(scene, EXPRESSION, model=shapes, refiner="sam")
    with pytest.raises(ValueError, match="unknown prompts='all'"):
        refam.segment(scene, EXPRESSION, model=shapes, prompts="all")
    with pytest.raises(refam.RefamError, match="redirect"):
        refam.segment(scene, "circle", model=shapes, gas="redirect", sinks=[0], append_magnets=False)
    assert issubclass(refam.RefamError, AttnlensError) and attnlens.refam is refam
