"""The ``shapes`` data: generated scenes of one or two coloured shapes with captions, and their grammar.

A scene is one object, or two objects one above the other (``vertical``) or side by side (``horizontal``).
An object is a ``size`` (small, large), a ``colour`` (six) and a ``shape`` (circle, square, triangle). Its
caption names every attribute; a two-object caption picks one of two phrasings at random, so the words, not
their order, carry the layout::

    a small red circle
    a large blue square above a small green circle      (== "a small green circle below a large blue square")
    a small yellow triangle to the left of a large cyan square

Composition is tested with **held-out colour-shape pairs** (:data:`HELDOUT_PAIRS`): no training scene
contains one; validation scenes come from the full distribution, so about a quarter of them hold at least
one pair the generator never saw (:func:`is_heldout`).

The same grammar is read back by :func:`parse_caption` (the canonical :class:`Scene`: the top or the left
object first) and turned into per-attribute targets by :func:`attribute_targets` for the alignment
classifier (``train_evaluator``) and the caption-alignment metric (``evaluate``). Pure python + numpy + PIL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
AXES = ("vertical", "horizontal")
RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40),
       "magenta": (220, 50, 220), "cyan": (40, 220, 230)}
HELDOUT_PAIRS = frozenset({("green", "triangle"), ("yellow", "circle"), ("blue", "square")})
RADIUS = {"small": 3.5, "large": 6.5}  # at 32 px; scaled with the image side
TWO_OBJECT_SHARE = 0.6

# Attribute heads of the alignment classifier: name -> number of values. "b_*" and "axis" are ignored (-1)
# for one-object scenes.
ATTRIBUTE_HEADS: tuple[tuple[str, int], ...] = (
    ("count", 2), ("a_shape", len(SHAPES)), ("a_colour", len(COLOURS)), ("a_size", len(SIZES)),
    ("b_shape", len(SHAPES)), ("b_colour", len(COLOURS)), ("b_size", len(SIZES)), ("axis", len(AXES)))
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # the class label: the first object's colour + shape


@dataclass(frozen=True)
class Obj:
    size: str
    colour: str
    shape: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, ``objects[0]`` is above (``vertical``) or left of (``horizontal``) the other."""

    objects: tuple[Obj, ...]
    axis: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2) or (len(self.objects) == 2) != (self.axis in AXES):
            raise ValueError(f"a scene is one object (no axis) or two (axis in {AXES}); got {self}")

    @property
    def label(self) -> int:
        """Class id: the first object's colour and shape (an index into :data:`CLASSES`)."""
        o = self.objects[0]
        return SHAPES.index(o.shape) * len(COLOURS) + COLOURS.index(o.colour)


def is_heldout(scene: Scene) -> bool:
    """Whether the scene holds a colour-shape pair that no training scene holds."""
    return any((o.colour, o.shape) in HELDOUT_PAIRS for o in scene.objects)


def draw_scene(rng: np.random.Generator, *, allow_heldout: bool) -> Scene:
    """A random scene; without ``allow_heldout`` scenes with a held-out pair are redrawn."""
    while True:
        n = 2 if rng.random() < TWO_OBJECT_SHARE else 1
        objs = tuple(Obj(SIZES[rng.integers(len(SIZES))], COLOURS[rng.integers(len(COLOURS))],
                         SHAPES[rng.integers(len(SHAPES))]) for _ in range(n))
        scene = Scene(objs, AXES[rng.integers(len(AXES))] if n == 2 else None)
        if allow_heldout or not is_heldout(scene):
            return scene


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """The caption of ``scene``; two objects are phrased either way round (drawn from ``rng``)."""
    if len(scene.objects) == 1:
        return scene.objects[0].words()
    first, second = scene.objects
    forward = rng.random() < 0.5
    if scene.axis == "vertical":
        return f"{first.words()} above {second.words()}" if forward else f"{second.words()} below {first.words()}"
    return (f"{first.words()} to the left of {second.words()}" if forward
            else f"{second.words()} to the right of {first.words()}")


_OBJ = rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_RELATIONS = {"above": ("vertical", True), "below": ("vertical", False),
              "to the left of": ("horizontal", True), "to the right of": ("horizontal", False)}
_CAPTION = re.compile(rf"^{_OBJ}(?: ({'|'.join(_RELATIONS)}) {_OBJ})?$")


def parse_caption(text: str) -> Scene | None:
    """The canonical scene a caption of this grammar describes (case and spacing are normalised), else None."""
    m = _CAPTION.match(" ".join(text.lower().replace(".", " ").split()))
    if m is None:
        return None
    g = m.groups()
    first = Obj(g[0], g[1], g[2])
    if g[3] is None:
        return Scene((first,))
    axis, forward = _RELATIONS[g[3]]
    second = Obj(g[4], g[5], g[6])
    return Scene((first, second) if forward else (second, first), axis)


def attribute_targets(scene: Scene | None) -> list[int]:
    """Targets for :data:`ATTRIBUTE_HEADS` (-1: not applicable, or every head -1 for no scene)."""
    if scene is None:
        return [-1] * len(ATTRIBUTE_HEADS)
    a = scene.objects[0]
    out = [len(scene.objects) - 1, SHAPES.index(a.shape), COLOURS.index(a.colour), SIZES.index(a.size)]
    if len(scene.objects) == 2:
        b = scene.objects[1]
        out += [SHAPES.index(b.shape), COLOURS.index(b.colour), SIZES.index(b.size), AXES.index(scene.axis)]
    else:
        out += [-1, -1, -1, -1]
    return out


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the scene's objects on black, placed at random where the layout allows."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    k = size / 32.0
    radii = [RADIUS[o.size] * k for o in scene.objects]
    if len(scene.objects) == 1:
        boxes = [(0.0, 0.0, float(size), float(size))]
    elif scene.axis == "vertical":
        boxes = [(0.0, 0.0, float(size), size / 2), (0.0, size / 2, float(size), float(size))]
    else:
        boxes = [(0.0, 0.0, size / 2, float(size)), (size / 2, 0.0, float(size), float(size))]
    for obj, r, (x0, y0, x1, y1) in zip(scene.objects, radii, boxes):
        cx = rng.uniform(x0 + r + 0.5, max(x0 + r + 0.5, x1 - r - 0.5))
        cy = rng.uniform(y0 + r + 0.5, max(y0 + r + 0.5, y1 - r - 0.5))
        fill = RGB[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            s = r * 0.9
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    return np.asarray(img, dtype=np.uint8)
