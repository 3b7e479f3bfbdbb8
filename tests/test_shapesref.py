"""ShapesRef: the synthetic world the embedded models are trained on and measured against.

The referring-expression checks resolve each expression with an independent reading of its words,
so a bug in the generator's own bookkeeping cannot hide behind itself.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from attnlens.datasets import shapesref as sr
from attnlens.datasets.shapesref import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SIZES,
    TEXTURE_AMPLITUDE,
    VOCAB,
    build_tokenizer,
    expressions,
    make_scene,
    make_video,
    split,
    word_roles,
)


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def resolve(text: str, objects, masks: np.ndarray) -> list[int]:
    """Which objects ``text`` can denote. ``masks``: (frame, object, height, width); a position must
    hold, by any margin, in every frame."""
    ws = words(text)
    assert ws[0] == "the"
    direction = None
    for word, phrase in POSITIONS.items():
        if text.endswith(" " + phrase):
            direction, ws = word, words(text[: -len(phrase)])
    *modifiers, noun = ws[1:]
    found = [i for i, o in enumerate(objects) if o.shape == noun]
    for m in modifiers:
        found = [i for i in found if m in (objects[i].colour, objects[i].size)]
    if direction is None:
        return found
    ys, xs = np.indices(masks.shape[-2:])
    coord = xs if direction in ("left", "right") else ys
    sign = 1 if direction in ("left", "top") else -1  # the winner has the smallest signed coordinate
    key = [sign * (masks[:, i] * coord).sum(axis=(1, 2)) / masks[:, i].sum(axis=(1, 2)) for i in found]
    return [
        i
        for i, k in zip(found, key, strict=True)
        if all(np.all(k < other) for other in key if other is not k)
    ]


def kind_of(text: str) -> str:
    ws = words(text)
    if any(text.endswith(" " + p) for p in POSITIONS.values()):
        return "position"
    return {2: "shape", 3: "colour_shape" if ws[1] in COLOURS else "size"}[len(ws)]


# ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_scene():
    a, b = make_scene(np.random.default_rng(7)), make_scene(np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert (a.caption, a.expressions, a.objects) == (b.caption, b.expressions, b.objects)
    c = make_scene(np.random.default_rng(8))
    assert c.caption != a.caption or not np.array_equal(c.image, a.image)


def test_frozen_splits_are_reproducible_and_randomly_accessible():
    first = list(split("test", n=4))
    again = list(split("test", n=4))
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all(np.array_equal(s.image, t.image) for s, t in zip(first, again, strict=True))
    (fourth,) = split("test", start=3, n=1)
    assert np.array_equal(fourth.image, first[3].image)
    assert first[0].caption != next(split("val")).caption  # splits differ
    assert sum(1 for _ in split("train", n=5)) == 5  # train is endless: take what you need


@pytest.mark.parametrize("world", ["v1", "v2", "v2-mono"])
def test_masks_are_exact_and_objects_do_not_overlap(world):
    w = sr.world_of(world)
    side = w.image_size
    for scene in split("train", n=60, world=world):
        image, masks = scene.image.astype(int), scene.masks
        assert image.shape == (side, side, 3) and scene.image.dtype == np.uint8
        assert masks.shape == (len(scene.objects), side, side) and masks.dtype == bool
        assert 1 <= len(scene.objects) <= w.max_objects
        assert masks.sum(axis=0).max() <= 1  # no pixel belongs to two objects
        for obj, mask in zip(scene.objects, masks, strict=True):
            assert obj.shape in w.shapes and obj.colour in w.colours
            assert mask.any() and (image[mask] == w.rgb(obj.colour)).all()
            x0, y0, x1, y1 = obj.box()
            assert 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side
            assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any()
            cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
            # every object spans 10 pixels or more each way: it reaches into at least 3 × 3 4-pixel tokens
            assert obj.extent >= 12 and cols[-1] - cols[0] + 1 >= 10 and rows[-1] - rows[0] + 1 >= 10
            if world == "v1" and obj.size == "large":  # spans at least 5 of its 4x4 patches
                assert cols[-1] - cols[0] + 1 >= 20
        outside = image[~masks.any(axis=0)]
        diff = np.abs(outside - np.array(BACKGROUNDS[scene.background]))
        assert diff.max() <= (TEXTURE_AMPLITUDE if scene.textured else 0)
        # background pixels never carry an object colour, so "drawn with its colour" == "in its mask"
        for rgb in COLOURS.values():
            assert not (outside == rgb).all(axis=1).any()


@pytest.mark.parametrize("world", ["v1", "v2"])
def test_every_test_expression_resolves_to_exactly_its_target(world):
    pairs = list(expressions("test", world=world))
    assert len(pairs) == 400
    for scene, e in pairs:
        assert resolve(e.text, scene.objects, scene.masks[None]) == [e.target], e.text
        assert e.kind == kind_of(e.text)
        assert (
            e.head_noun == scene.objects[e.target].shape == words(e.text)[-1 if e.kind != "position" else 1]
        )
        colour = scene.objects[e.target].colour
        others = [o for i, o in enumerate(scene.objects) if i != e.target]
        assert e.has_same_colour_distractor == any(o.colour == colour for o in others)
        if e.kind in ("size", "position"):  # size and position matter only when the noun is shared
            assert sum(o.shape == e.head_noun for o in scene.objects) >= 2


@pytest.mark.parametrize("world", ["v1", "v2"])
def test_colour_alone_does_not_solve_the_test_split(world):
    pairs = list(expressions("test", world=world))
    share = np.mean([e.has_same_colour_distractor for _, e in pairs])
    assert share >= 0.4
    assert {e.kind for _, e in pairs} == {"colour_shape", "shape", "size", "position"}
    # the knob controls it
    scenes = [make_scene(np.random.default_rng(i), p_same_colour=0.0, world=world) for i in range(30)]
    assert not any(e.has_same_colour_distractor for s in scenes for e in s.expressions)


def test_each_world_has_its_own_frozen_splits():
    v1, v2 = next(split("test", world="v1")), next(split("test", world="v2"))
    assert (v1.image.shape, v2.image.shape) == ((64, 64, 3), (32, 32, 3))
    again = next(split("test", world=sr.world_of("v2")))  # a World or its name: the same split
    assert np.array_equal(v2.image, again.image) and v2.caption == again.caption
    assert len(list(expressions("test", world="v2"))) == 400


def test_the_monochrome_world_never_names_a_colour():
    for scene in split("train", n=40, world="v2-mono"):
        named = set(words(scene.caption)) | {w for e in scene.expressions for w in words(e.text)}
        assert not named & set(COLOURS)
        assert all(e.kind != "colour_shape" for e in scene.expressions)
        assert scene.background in ("grey", "black")  # never the white the objects are drawn in


def test_tokenizer_round_trip_without_unknown_words():
    tok = build_tokenizer()
    assert tok.model_max_length == 24 and tok.pad_token == "[PAD]" and tok.pad_token_id == 0
    assert len(tok) == len(VOCAB)
    texts = [s.caption for s in split("train", n=100)] + [e.text for _, e in expressions("val")]
    enc = tok(texts, padding="max_length", truncation=True, return_tensors="np")
    assert enc["input_ids"].shape == (len(texts), 24)
    assert not (enc["input_ids"] == tok.unk_token_id).any()
    for text, ids, attention in zip(texts, enc["input_ids"], enc["attention_mask"], strict=True):
        n = len(words(text))
        assert tok.convert_ids_to_tokens(ids.tolist()) == [*words(text), "[EOS]"] + ["[PAD]"] * (23 - n)
        assert attention.tolist() == [1] * (n + 1) + [0] * (23 - n)
    assert tok.decode(tok("the red circle")["input_ids"], skip_special_tokens=True) == "the red circle"
    assert tok.convert_ids_to_tokens(tok("a pink circle")["input_ids"]) == ["a", "[UNK]", "circle", "[EOS]"]


def test_word_roles_cover_the_vocabulary():
    roles = word_roles()
    assert set(roles) == set(VOCAB)
    assert [roles[w] for w in words("the small red circle on the left, on a grey background")] == [
        *("stop", "size", "colour", "shape", "stop", "stop", "position", "punctuation"),
        *("stop", "stop", "colour", "other"),
    ]
    assert {w for w, r in roles.items() if r == "size"} == set(SIZES)


def test_video_objects_move_rigidly_without_overlap():
    video = make_video(np.random.default_rng(5), n_objects=4, n_frames=5)
    frames, masks = video.frames, video.masks
    assert frames.shape == (5, 64, 64, 3) and masks.shape == (5, 4, 64, 64)
    for i, obj in enumerate(video.objects):
        dx, dy = obj.velocity
        assert (dx, dy) != (0, 0)
        for t in range(5):
            moved = np.roll(masks[0, i], (t * dy, t * dx), axis=(0, 1))
            assert np.array_equal(masks[t, i], moved)  # a pure translation that never leaves the canvas
            assert (frames[t][masks[t, i]] == COLOURS[obj.colour]).all()
    assert masks.sum(axis=1).max() <= 1
    background = ~masks.any(axis=1)
    assert np.array_equal(
        frames[0][background[0] & background[-1]], frames[-1][background[0] & background[-1]]
    )


@pytest.mark.parametrize("world", ["v1", "v2"])
def test_video_expressions_hold_in_every_frame(world):
    for video, e in expressions("test", n=150, video=True, world=world):
        assert resolve(e.text, video.objects, video.masks) == [e.target], e.text
        assert video.masks.shape[1] <= sr.world_of(world).max_video_objects


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_scene(np.random.default_rng(0), n_objects=5), "n_objects"),
        (lambda: make_scene(np.random.default_rng(0), n_objects=0), "n_objects"),
        (lambda: make_scene(np.random.default_rng(0), image_size=40), "too small"),
        (lambda: make_scene(np.random.default_rng(0), sizes_px=(12, 10)), "sizes_px"),
        (lambda: make_scene(np.random.default_rng(0), p_same_colour=1.5), "p_same_colour"),
        (lambda: make_video(np.random.default_rng(0), n_frames=1), "n_frames"),
        (lambda: make_video(np.random.default_rng(0), max_speed=0), "max_speed"),
        (lambda: split("dev"), "unknown split"),
        (lambda: split("test", world="v3"), "unknown ShapesRef world 'v3'"),
        (lambda: make_scene(np.random.default_rng(0), world="v2", n_objects=4), "n_objects"),
        (lambda: make_video(np.random.default_rng(0), world="v2", n_objects=3), "n_objects"),
        (lambda: sr.world_of("v2", {"shapes": ("circle", "hexagon")}), "shapes must be"),
        (lambda: expressions("test", n=401), "holds 400"),
        (lambda: build_tokenizer(max_length=1), "max_length"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rng_must_be_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        make_scene(0)


def test_public_api_is_listed():
    assert set(sr.__all__) <= set(dir(sr))
