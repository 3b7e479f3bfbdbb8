"""ShapesRef: a synthetic world of coloured shapes with exact masks, captions and referring expressions.

Scenes hold non-overlapping objects on a plain or lightly speckled background, drawn from a
:class:`World`: ``"v1"`` (64 × 64 pixels, 1-4 objects of 6 shapes × 6 colours × 2 sizes) or ``"v2"``
(32 × 32 pixels, 1-3 objects of 4 shapes × 4 colours × 2 sizes, each at least 12 pixels wide, so
3 × 3 tokens of a 4-pixel patch grid), and ``"v2-mono"``, v2's shapes in one colour, captioned
without colour words (a curriculum's first stage). Drawing has no anti-aliasing, so a pixel
belongs to an object's mask exactly when it carries that object's colour. Each scene has a caption
with stop words and a list of referring expressions, each of which picks out exactly one object by
colour and shape, by shape alone, by size, or by position. The world is built so that colour alone
does not solve it: objects often share a colour with another object of a different shape.

>>> rng = np.random.default_rng(0)
>>> scene = make_scene(rng, n_objects=2)
>>> scene.image.shape, scene.masks.shape  # (height, width, rgb), (object, height, width)
((64, 64, 3), (2, 64, 64))
>>> tok = build_tokenizer()
>>> len(tok(scene.caption, padding="max_length")["input_ids"])
24
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BACKGROUNDS",
    "BASELINES",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPECIAL_TOKENS",
    "SPLITS",
    "STOP_WORDS",
    "TEXTURE_AMPLITUDE",
    "VOCAB",
    "WORLDS",
    "Expression",
    "ObjectSpec",
    "Scene",
    "Video",
    "World",
    "baselines",
    "build_tokenizer",
    "expressions",
    "make_scene",
    "make_video",
    "split",
    "word_roles",
    "world_of",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
    "orange": (245, 135, 20),
}
"""Object colours: name -> RGB."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "black": (28, 28, 28),
    "white": (228, 228, 228),
}
"""Background colours: name -> RGB (texture adds grey-level noise of at most ``TEXTURE_AMPLITUDE``)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
"""Position word -> the phrase that follows the noun in a position expression."""

STOP_WORDS: tuple[str, ...] = (
    *("a", "an", "the", "and", "on", "at", "of", "in", "with", "to", "by", "is", "are"),
    *("there", "this", "that", "it", "its", "some", "above", "below"),
)
"""Stop words in the vocabulary: those the captions use plus common ones for free-form prompts."""

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[EOS]")
_PUNCTUATION = (",", ".")
VOCAB: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    *sorted({*STOP_WORDS, *_PUNCTUATION, *COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS, "background"}),
)
"""The closed vocabulary; a word's token id is its index here."""

SPLITS: dict[str, int | None] = {"train": None, "val": 200, "test": 400}
"""Split name -> number of referring expressions it holds (``None``: an endless stream)."""

_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
TEXTURE_AMPLITUDE = 12  # background noise lies in [-12, 12] grey levels
_GAP = 2  # minimum empty pixels between the bounding squares of two objects
MONO_RGB = (235, 235, 235)  # the one object colour of a monochrome world (not a vocabulary colour)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class World:
    """What a ShapesRef world holds: the canvas, which words of :data:`VOCAB` it draws, how often.

    Every world shares the vocabulary and tokenizer; a world uses a subset of its colours and shapes.

    Attributes:
        name: the key in :data:`WORLDS`.
        image_size: side of the square images in pixels.
        sizes_px: sides of the bounding squares of small and large objects.
        shapes, colours, backgrounds: the names drawn (from :data:`SHAPES`, :data:`COLOURS`,
            :data:`BACKGROUNDS`).
        max_objects: scenes hold 1 to this many objects.
        p_same_colour: chance that an object reuses a colour already in the scene (with a new shape);
            it controls the share of expressions with a same-colour distractor.
        p_same_shape: chance that an object reuses a shape already in the scene (with a new colour);
            size and position expressions need repeated shapes.
        p_texture: chance of a speckled rather than plain background.
        monochrome: every object is drawn in :data:`MONO_RGB` and no caption or expression names
            an object colour.
        max_speed: the largest ``|dx|`` and ``|dy|`` of a video's objects, in pixels per frame.
        max_video_objects: videos hold 1 to this many objects (moving objects need room).
        seed: mixed into every split's seeds, so that each world has its own frozen splits.

    Examples:
        >>> w = world_of("v2")
        >>> w.image_size, w.shapes, w.colours
        (32, ('circle', 'square', 'triangle', 'cross'), ('red', 'green', 'blue', 'yellow'))
        >>> world_of("v2-mono").monochrome
        True
    """

    name: str
    image_size: int
    sizes_px: tuple[int, int]
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    max_objects: int = 4
    p_same_colour: float = 0.5
    p_same_shape: float = 0.4
    p_texture: float = 0.5
    monochrome: bool = False
    max_speed: int = 3
    max_video_objects: int = 4
    seed: int | None = None

    def __post_init__(self) -> None:
        for label, names, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, COLOURS),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ValueError(f"{label} must be a non-empty subset of {', '.join(known)}; got {names!r}")
        _check_int("max_objects", self.max_objects, 1, 4)
        _check_int("image_size", self.image_size, 1)
        small, large = self.sizes_px
        _check_int("sizes_px[0]", small, 6)
        _check_int("sizes_px[1]", large, small + 1)
        if 2 * large + _GAP > self.image_size:
            raise ValueError(
                f"image_size={self.image_size} is too small for objects of {large} px: several large "
                f"objects need image_size >= {2 * large + _GAP}"
            )
        for label in ("p_same_colour", "p_same_shape", "p_texture"):
            p = getattr(self, label)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {p!r}")

    def rgb(self, colour: str) -> tuple[int, int, int]:
        """The RGB an object named ``colour`` is drawn in."""
        return MONO_RGB if self.monochrome else COLOURS[colour]


_V2 = World(
    "v2",
    image_size=32,
    sizes_px=(12, 14),
    shapes=("circle", "square", "triangle", "cross"),
    colours=("red", "green", "blue", "yellow"),
    max_objects=3,
    p_same_colour=0.6,
    max_speed=1,
    max_video_objects=2,
    seed=2,
)
WORLDS: dict[str, World] = {
    "v1": World("v1", image_size=64, sizes_px=(12, 22), shapes=SHAPES, colours=tuple(COLOURS)),
    "v2": _V2,
    "v2-mono": replace(
        _V2, name="v2-mono", colours=_V2.colours[:1], backgrounds=("grey", "black"), monochrome=True
    ),
}
"""The ShapesRef worlds by name. ``"v1"`` is the default of every function that takes a world."""


def world_of(w: World | str = "v1", overrides: dict | None = None) -> World:
    """The :class:`World` named ``w`` (or ``w`` itself), with ``overrides`` of its fields.

    Examples:
        >>> world_of("v2", {"max_objects": 1}).max_objects
        1
        >>> world_of("v3")
        Traceback (most recent call last):
        ...
        ValueError: unknown ShapesRef world 'v3'; valid: v1, v2, v2-mono
    """
    if isinstance(w, str):
        if w not in WORLDS:
            raise ValueError(f"unknown ShapesRef world {w!r}; valid: {', '.join(WORLDS)}")
        w = WORLDS[w]
    if not isinstance(w, World):
        raise TypeError(f"world must be a World or a name, got {type(w).__name__}")
    return replace(w, **overrides) if overrides else w


@dataclass(frozen=True)
class ObjectSpec:
    """One object: what it is and where its bounding square lies (in frame 0 for videos).

    Attributes:
        shape, colour, size: names from :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`.
        x, y: column and row of the bounding square's top-left pixel.
        extent: side of the bounding square in pixels.
        velocity: ``(dx, dy)`` pixels per frame; ``(0, 0)`` in still scenes.

    Examples:
        >>> ObjectSpec("circle", "red", "small", x=3, y=5, extent=12, velocity=(1, 0)).box(frame=2)
        (5, 5, 17, 17)
    """

    shape: str
    colour: str
    size: str
    x: int
    y: int
    extent: int
    velocity: tuple[int, int] = (0, 0)

    def box(self, frame: int = 0) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the bounding square in ``frame``, end exclusive."""
        x0, y0 = self.x + frame * self.velocity[0], self.y + frame * self.velocity[1]
        return x0, y0, x0 + self.extent, y0 + self.extent


@dataclass(frozen=True)
class Expression:
    """A referring expression that picks out exactly one object of its scene.

    Attributes:
        text: e.g. ``"the red circle"``, ``"the triangle"``, ``"the small square"``,
            ``"the circle on the left"``.
        target: index of the referred object in ``scene.objects`` (and ``scene.masks``).
        kind: ``"colour_shape"``, ``"shape"``, ``"size"`` or ``"position"``.
        head_noun: the shape word, the expression's head noun.
        has_same_colour_distractor: whether another object of the scene has the target's colour.
    """

    text: str
    target: int
    kind: str
    head_noun: str
    has_same_colour_distractor: bool


@dataclass(frozen=True, eq=False)
class Scene:
    """A still ShapesRef scene.

    Attributes:
        image: ``(height, width, 3)`` uint8 RGB.
        masks: ``(object, height, width)`` bool, one exact mask per object.
        objects: the objects, in the order of ``masks``.
        background: a name from :data:`BACKGROUNDS`.
        textured: whether the background carries grey-level noise.
        caption: e.g. ``"a red circle and a small blue square on a grey background"``.
        expressions: every referring expression the scene supports.
    """

    image: np.ndarray
    masks: np.ndarray
    objects: tuple[ObjectSpec, ...]
    background: str
    textured: bool
    caption: str
    expressions: tuple[Expression, ...]


@dataclass(frozen=True, eq=False)
class Video:
    """A ShapesRef video: the objects of a scene moving in straight lines.

    Attributes:
        frames: ``(frame, height, width, 3)`` uint8 RGB.
        masks: ``(frame, object, height, width)`` bool.
        objects, background, textured, caption: as in :class:`Scene`.
        expressions: as in :class:`Scene`; position expressions hold in every frame.
    """

    frames: np.ndarray
    masks: np.ndarray
    objects: tuple[ObjectSpec, ...]
    background: str
    textured: bool
    caption: str
    expressions: tuple[Expression, ...]


def make_scene(
    rng: np.random.Generator, *, n_objects: int | None = None, world: World | str = "v1", **overrides: object
) -> Scene:
    """Draw one still scene from ``rng``.

    Args:
        rng: the only source of randomness; the same state gives the same scene.
        n_objects: 1 to the world's ``max_objects``, or ``None`` to draw it uniformly.
        world: a :class:`World` or its name in :data:`WORLDS`.
        overrides: fields of the world to change, e.g. ``p_same_colour=0.0`` (see :class:`World`).

    Examples:
        >>> scene = make_scene(np.random.default_rng(1), n_objects=3)
        >>> scene.image.shape, scene.image.dtype, scene.masks.shape  # (h, w, rgb), (object, h, w)
        ((64, 64, 3), dtype('uint8'), (3, 64, 64))
        >>> scene.caption
        'a small blue cross, a small red circle and a red triangle on a black background'
        >>> [(e.text, e.target) for e in scene.expressions][1:3]
        [('the cross', 0), ('the red circle', 1)]
        >>> make_scene(np.random.default_rng(1), world="v2-mono").caption
        'a small triangle and a circle on a black background'
    """
    w = world_of(world, overrides)
    objects, background, texture = _sample(rng, n_objects, w, 1, 0)
    image, masks = _render(objects, background, texture, w, frame=0)
    caption = _caption(rng, objects, background, w)
    return Scene(
        image, masks, objects, background, texture is not None, caption, _expressions(objects, masks[None], w)
    )


def make_video(
    rng: np.random.Generator,
    *,
    n_frames: int = 4,
    max_speed: int | None = None,
    n_objects: int | None = None,
    world: World | str = "v1",
    **overrides: object,
) -> Video:
    """Draw one video: every object moves by a constant whole-pixel velocity, never leaving the
    canvas nor touching another object. The background stays still. Other arguments are as in
    :func:`make_scene`.

    Args:
        n_frames: number of frames (at least 2).
        max_speed: largest ``|dx|`` and ``|dy|`` in pixels per frame (at least 1; ``None``: the
            world's); no object stands still.

    Examples:
        >>> video = make_video(np.random.default_rng(0), n_objects=2)
        >>> video.frames.shape, video.masks.shape  # (frame, h, w, rgb), (frame, object, h, w)
        ((4, 64, 64, 3), (4, 2, 64, 64))
        >>> [o.velocity for o in video.objects]  # (dx, dy) pixels per frame
        [(-3, -2), (3, 0)]
    """
    _check_int("n_frames", n_frames, 2)
    w = world_of(world, overrides)
    max_speed = w.max_speed if max_speed is None else max_speed
    _check_int("max_speed", max_speed, 1)
    w = replace(w, max_objects=min(w.max_objects, w.max_video_objects))
    objects, background, texture = _sample(rng, n_objects, w, n_frames, max_speed)
    drawn = [_render(objects, background, texture, w, frame=t) for t in range(n_frames)]
    frames = np.stack([image for image, _ in drawn])
    masks = np.stack([m for _, m in drawn])
    caption = _caption(rng, objects, background, w)
    return Video(
        frames, masks, objects, background, texture is not None, caption, _expressions(objects, masks, w)
    )


def split(
    name: str, n: int | None = None, *, start: int = 0, video: bool = False, world: World | str = "v1"
) -> Iterator[Scene | Video]:
    """Iterate the scenes (or videos) of a frozen split of a world.

    Scene ``i`` of a split is drawn from its own generator seeded by ``(split seed, video, i)`` (and
    the world's ``seed``), so any
    scene can be reached without drawing the ones before it (``start``). ``"train"`` is endless;
    ``"val"`` and ``"test"`` hold the scenes whose expressions make up their :data:`SPLITS` count.

    Args:
        name: ``"train"``, ``"val"`` or ``"test"``.
        n: how many scenes to yield (``None``: all, or forever for ``"train"``).
        start: index of the first scene.
        video: yield :class:`Video` samples from the video variant of the split.
        world: a :class:`World` or its name.

    Examples:
        >>> [len(s.objects) for s in split("test", n=3)]
        [4, 2, 4]
        >>> [len(s.objects) for s in split("test", n=3, world="v2")]
        [3, 1, 1]
    """
    w = world_of(world)
    n_scenes = _n_split_scenes(name, video, w)
    if n is not None:
        _check_int("n", n, 0)
    _check_int("start", start, 0)
    stop = n_scenes if n is None else start + n if n_scenes is None else min(start + n, n_scenes)
    indices = itertools.count(start) if stop is None else range(start, stop)
    return (_scene_at(name, video, i, w) for i in indices)


def expressions(
    name: str, n: int | None = None, *, video: bool = False, world: World | str = "v1"
) -> Iterator[tuple[Scene | Video, Expression]]:
    """Iterate ``(scene, expression)`` pairs of a split, scene by scene.

    Args:
        name: ``"train"``, ``"val"`` or ``"test"``.
        n: how many pairs (``None``: the split's :data:`SPLITS` count, or forever for ``"train"``);
            at most that count for ``"val"`` and ``"test"``.
        video: draw from the video variant of the split.
        world: a :class:`World` or its name.

    Examples:
        >>> [(e.text, e.kind, e.target) for _, e in expressions("test", n=2)]
        [('the green circle', 'colour_shape', 0), ('the circle at the top', 'position', 0)]
    """
    _check_split(name)
    size = SPLITS[name]
    if n is not None:
        _check_int("n", n, 0)
    if n is not None and size is not None and n > size:
        raise ValueError(f"split {name!r} holds {size} expressions, asked for n={n}")
    pairs = ((scene, e) for scene in split(name, video=video, world=world) for e in scene.expressions)
    count = size if n is None else n
    return pairs if count is None else itertools.islice(pairs, count)


BASELINES = (
    "whole image",
    "centre box",
    "union of objects",
    "random object",
    "token-grid ceiling",
    "colour lookup",
)


def baselines(pairs: list[tuple[Scene, Expression]], patch: int = 8) -> dict[str, np.ndarray]:
    """``(expression, H, W)`` bool masks that need no model, one per name in :data:`BASELINES`.

    ``centre box`` is the middle half of each side; ``random object`` one of the scene's objects,
    drawn at random (seeded by the expression's index): what a perfect segmenter scores when it
    has no idea which object is meant; ``token-grid ceiling`` the target rounded to
    ``patch`` × ``patch`` cells (the best mask a map on a model's token grid draws unrefined);
    ``colour lookup`` every pixel of the colour the expression names (the union of objects where
    it names none): what colour alone achieves.

    Examples:
        >>> pairs = list(expressions("test", n=3))
        >>> {name: m.shape for name, m in baselines(pairs).items()}["colour lookup"]
        (3, 64, 64)
    """
    targets = np.stack([s.masks[e.target] for s, e in pairs])
    n, h, w = targets.shape
    centre = np.zeros_like(targets)
    centre[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    cells = targets.reshape(n, h // patch, patch, w // patch, patch).mean((2, 4)) >= 0.5
    lookup = []
    for s, e in pairs:
        colour = next((word for word in e.text.split() if word in COLOURS), None)
        lookup.append(s.masks.any(0) if colour is None else (s.image == np.array(COLOURS[colour])).all(-1))
    masks = (
        np.ones_like(targets),
        centre,
        np.stack([s.masks.any(0) for s, _ in pairs]),
        np.stack(
            [s.masks[np.random.default_rng(i).integers(len(s.masks))] for i, (s, _) in enumerate(pairs)]
        ),
        np.repeat(np.repeat(cells, patch, axis=1), patch, axis=2),
        np.stack(lookup),
    )
    return dict(zip(BASELINES, masks, strict=True))


def word_roles() -> dict[str, str]:
    """The role of every vocabulary word: ``"special"``, ``"stop"``, ``"punctuation"``, ``"colour"``
    (object and background colours), ``"shape"``, ``"size"``, ``"position"`` or ``"other"``.

    Examples:
        >>> roles = word_roles()
        >>> roles["the"], roles["red"], roles["ring"], roles["small"], roles["left"], roles["[PAD]"]
        ('stop', 'colour', 'shape', 'size', 'position', 'special')
    """
    groups = {
        "special": SPECIAL_TOKENS,
        "stop": STOP_WORDS,
        "punctuation": _PUNCTUATION,
        "colour": (*COLOURS, *BACKGROUNDS),
        "shape": SHAPES,
        "size": SIZES,
        "position": tuple(POSITIONS),
    }
    role_of = {word: role for role, words in groups.items() for word in words}
    return {word: role_of.get(word, "other") for word in VOCAB}


def build_tokenizer(max_length: int = 24) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCAB`, as a ``transformers.PreTrainedTokenizerFast``.

    Text is lower-cased and split on white space and punctuation; every word is one token, unknown
    words map to ``[UNK]``, ``[EOS]`` is appended (as T5 does in FLUX), and ``padding="max_length"``
    pads with ``[PAD]`` (id 0) on the right to ``max_length`` (the tokenizer's ``model_max_length``).
    The longest caption takes 23 words, so the default 24 never truncates one.

    Examples:
        >>> tok = build_tokenizer(max_length=8)
        >>> enc = tok("The red circle, on the left", padding="max_length", truncation=True)
        >>> tok.convert_ids_to_tokens(enc["input_ids"])
        ['the', 'red', 'circle', ',', 'on', 'the', 'left', '[EOS]']
        >>> tok("a ring", padding="max_length")["attention_mask"]
        [1, 1, 1, 0, 0, 0, 0, 0]
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    _check_int("max_length", max_length, 2)
    ids = {word: i for i, word in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", pair="$A [EOS] $B [EOS]", special_tokens=[("[EOS]", ids["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        model_max_length=max_length,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------------------
# Internals


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")


def _scene_at(name: str, video: bool, index: int, w: World) -> Scene | Video:
    key = [_SPLIT_SEEDS[name], int(video), index] + ([] if w.seed is None else [w.seed])
    rng = np.random.default_rng(key)
    return make_video(rng, world=w) if video else make_scene(rng, world=w)


@functools.cache
def _n_split_scenes(name: str, video: bool, w: World) -> int | None:
    """Number of scenes a frozen split spans (``None`` for the endless ``"train"``)."""
    _check_split(name)
    size = SPLITS[name]
    if size is None:
        return None
    i = total = 0
    while total < size:
        total += len(_scene_at(name, video, i, w).expressions)
        i += 1
    return i


def _sample(
    rng: np.random.Generator, n_objects: int | None, w: World, n_frames: int, max_speed: int
) -> tuple[tuple[ObjectSpec, ...], str, np.ndarray | None]:
    """Draw objects (attributes, positions, velocities), background and texture."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if n_objects is not None:
        _check_int("n_objects", n_objects, 1, w.max_objects)
    n = int(rng.integers(1, w.max_objects + 1)) if n_objects is None else int(n_objects)
    colours: list[str] = []
    shapes: list[str] = []
    pairs: set[tuple[str, str]] = set()
    for _ in range(n):
        used = list(dict.fromkeys(colours))
        fresh = [c for c in w.colours if c not in used]
        pool = used if used and (rng.random() < w.p_same_colour or not fresh) else fresh
        colour = pool[rng.integers(len(pool))]
        free = [s for s in w.shapes if (colour, s) not in pairs]  # no two objects share colour and shape
        seen = [s for s in free if s in shapes]
        fresh = [s for s in free if s not in shapes] or free
        pool = seen if seen and rng.random() < w.p_same_shape else fresh
        colours.append(colour)
        shapes.append(pool[rng.integers(len(pool))])
        pairs.add((colour, shapes[-1]))
    sizes = [SIZES[i] for i in rng.integers(2, size=n)]
    small, large = w.sizes_px
    extents = [small if s == "small" else large for s in sizes]
    placed = _place(rng, extents, w.image_size, n_frames, max_speed)
    objects = tuple(
        ObjectSpec(shape, colour, size, x, y, e, v)
        for shape, colour, size, e, (x, y, v) in zip(shapes, colours, sizes, extents, placed, strict=True)
    )
    background = w.backgrounds[rng.integers(len(w.backgrounds))]
    texture = None
    if rng.random() < w.p_texture:
        texture = rng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, size=(w.image_size, w.image_size))
    return objects, background, texture


def _place(
    rng: np.random.Generator, extents: list[int], image_size: int, n_frames: int, max_speed: int
) -> list[tuple[int, int, tuple[int, int]]]:
    """Rejection-sample top-left corners and velocities so that, in every frame, each bounding square
    lies inside the canvas and at least ``_GAP`` pixels from every other."""
    t = range(n_frames)
    for _ in range(100):
        placed: list[tuple[int, int, tuple[int, int]]] = []
        for e in extents:
            for _ in range(200):
                v = (0, 0)
                while max_speed and v == (0, 0):
                    v = tuple(int(d) for d in rng.integers(-max_speed, max_speed + 1, size=2))
                travel = [(n_frames - 1) * d for d in v]
                lo = [max(0, -d) for d in travel]
                hi = [image_size - e - max(0, d) for d in travel]
                if hi[0] < lo[0] or hi[1] < lo[1]:
                    continue
                x, y = (int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True))
                if all(
                    _apart((x, y, v, e), (px, py, pv, extents[j]), t) for j, (px, py, pv) in enumerate(placed)
                ):
                    placed.append((x, y, v))
                    break
            else:
                break
        else:
            return placed
    raise RuntimeError("could not place the objects without overlap; use fewer or smaller objects")


def _apart(a: tuple, b: tuple, t: range) -> bool:
    """Whether two moving squares ``(x, y, velocity, extent)`` keep ``_GAP`` pixels apart at all ``t``."""
    (ax, ay, av, ae), (bx, by, bv, be) = a, b
    for f in t:  # plain ints: this runs in the placement's rejection loop, where numpy's overhead dominates
        x0, y0, x1, y1 = ax + f * av[0], ay + f * av[1], bx + f * bv[0], by + f * bv[1]
        if not (x0 + ae + _GAP <= x1 or x1 + be + _GAP <= x0 or y0 + ae + _GAP <= y1 or y1 + be + _GAP <= y0):
            return False
    return True


@functools.cache
def _stencil(shape: str, extent: int) -> np.ndarray:
    """``(extent, extent)`` bool: which pixels of the bounding square the shape covers (pixel centres)."""
    c = (np.arange(extent) + 0.5) / extent * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")  # v: down, u: right, both in (-1, 1)
    r = np.hypot(u, v)
    masks = {
        "circle": r <= 1,
        "square": (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9),
        "triangle": np.abs(u) <= (v + 1) / 2,
        "cross": ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)),
        "ring": (r <= 1) & (r >= 0.55),
        "diamond": np.abs(u) + np.abs(v) <= 1,
    }
    out = masks[shape]
    out.setflags(write=False)
    return out


def _render(
    objects: tuple[ObjectSpec, ...], background: str, texture: np.ndarray | None, w: World, frame: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame: ``(height, width, 3)`` uint8 image and ``(object, height, width)`` bool masks."""
    image_size = w.image_size
    base = np.full((image_size, image_size, 3), BACKGROUNDS[background], dtype=np.int16)
    if texture is not None:
        base += texture[..., None].astype(np.int16)
    image = np.clip(base, 0, 255).astype(np.uint8)
    masks = np.zeros((len(objects), image_size, image_size), dtype=bool)
    for i, obj in enumerate(objects):
        x0, y0, x1, y1 = obj.box(frame)
        masks[i, y0:y1, x0:x1] = _stencil(obj.shape, obj.extent)
        image[masks[i]] = w.rgb(obj.colour)
    return image, masks


def _with_article(words: list[str]) -> str:
    return " ".join(["an" if words[0][0] in "aeiou" else "a", *words])


def _caption(rng: np.random.Generator, objects: tuple[ObjectSpec, ...], background: str, w: World) -> str:
    """E.g. ``"a red circle, a small blue square and a ring on a grey background"``; each size word is
    said with probability 1/2, colour words only in a world of several colours."""
    says_size = rng.random(len(objects)) < 0.5
    mentions = [
        _with_article([o.size] * bool(s) + [o.colour] * (not w.monochrome) + [o.shape])
        for o, s in zip(objects, says_size, strict=True)
    ]
    listed = mentions[0] if len(mentions) == 1 else ", ".join(mentions[:-1]) + " and " + mentions[-1]
    return f"{listed} on a {background} background"


def _expressions(objects: tuple[ObjectSpec, ...], masks: np.ndarray, w: World) -> tuple[Expression, ...]:
    """Every expression that picks out exactly one object, given ``(frame, object, height, width)`` masks."""
    ys, xs = np.indices(masks.shape[-2:])
    area = masks.sum(axis=(-2, -1))
    cx = (masks * xs).sum(axis=(-2, -1)) / area  # (frame, object)
    cy = (masks * ys).sum(axis=(-2, -1)) / area
    margin = masks.shape[-1] / 8  # a position must win by at least two 4-pixel patches at 64 px
    found: list[Expression] = []
    for i, obj in enumerate(objects):
        same_shape = [j for j, o in enumerate(objects) if o.shape == obj.shape and j != i]
        same_colour = any(o.colour == obj.colour for j, o in enumerate(objects) if j != i)
        texts = [] if w.monochrome else [(f"the {obj.colour} {obj.shape}", "colour_shape")]
        if not same_shape:
            texts.append((f"the {obj.shape}", "shape"))
        else:
            if all(objects[j].size != obj.size for j in same_shape):
                texts.append((f"the {obj.size} {obj.shape}", "size"))
            leads = {  # (frame, other): how far the target is ahead of each other same-shape object
                "left": cx[:, same_shape] - cx[:, [i]],
                "right": cx[:, [i]] - cx[:, same_shape],
                "top": cy[:, same_shape] - cy[:, [i]],
                "bottom": cy[:, [i]] - cy[:, same_shape],
            }
            texts += [
                (f"the {obj.shape} {POSITIONS[w]}", "position") for w, d in leads.items() if d.min() >= margin
            ]
        found += [Expression(text, i, kind, obj.shape, same_colour) for text, kind in texts]
    return tuple(found)
