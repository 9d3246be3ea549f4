"""The "shapes" synthetic data set: scenes of named shapes, their renderer and their captions.

Every image is a pure function of a `Scene`, and every scene of a split is a pure function of
(split seed, index), so the data set is reproduced exactly from its seed. The renderer's ground truth
(`Scene`) is what the independent checker (`checker.py`) is scored against.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "shapes-1.0"
IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "large")

# Half-extent in pixels of a shape, by number of shapes in the scene and size word.
_HALF_EXTENT: dict[int, dict[str, int]] = {
    1: {"small": 10, "large": 18},
    2: {"small": 7, "large": 12},
    3: {"small": 8},
}
_STAR_INNER_RATIO = 0.45

Relation = Literal["alone", "above", "below", "left of", "right of", "row", "column"]


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """One image: shapes in caption order, how they are laid out, and the background colour."""

    shapes: tuple[ShapeSpec, ...]
    relation: Relation
    background: str

    def to_dict(self) -> dict[str, object]:
        return {
            "shapes": [asdict(s) for s in self.shapes],
            "relation": self.relation,
            "background": self.background,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Scene:
        shapes = tuple(ShapeSpec(**s) for s in data["shapes"])  # type: ignore[union-attr, arg-type]
        return cls(shapes=shapes, relation=data["relation"], background=str(data["background"]))  # type: ignore[arg-type]


# --- class-conditional variant: one shape, class id = shape x colour ---------------------------------

CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)


def class_id(shape: str, colour: str) -> int:
    return SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def class_attributes(cid: int) -> tuple[str, str]:
    """Class id -> (shape, colour)."""
    if not 0 <= cid < len(CLASS_NAMES):
        raise ValueError(f"class id {cid} is outside 0..{len(CLASS_NAMES) - 1}")
    return SHAPES[cid // len(COLOURS)], list(COLOURS)[cid % len(COLOURS)]


# --- captions ----------------------------------------------------------------------------------------


def _phrase(spec: ShapeSpec, with_size: bool = True) -> str:
    words = f"{spec.size} {spec.colour} {spec.shape}" if with_size else f"{spec.colour} {spec.shape}"
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def caption(scene: Scene) -> str:
    """The programmatic caption, e.g. "a small red star above a large blue circle on a white background"."""
    bg = f"on a {scene.background} background"
    s = scene.shapes
    if scene.relation == "alone":
        return f"{_phrase(s[0])} {bg}"
    if scene.relation in ("above", "below"):
        return f"{_phrase(s[0])} {scene.relation} {_phrase(s[1])} {bg}"
    if scene.relation in ("left of", "right of"):
        return f"{_phrase(s[0])} to the {scene.relation} {_phrase(s[1])} {bg}"
    listing = f"{_phrase(s[0], False)}, {_phrase(s[1], False)} and {_phrase(s[2], False)}"
    return f"{listing} in a {scene.relation} {bg}"


# --- layout and rendering ----------------------------------------------------------------------------


def _centres(scene: Scene) -> list[tuple[float, float]]:
    """Pixel centre (x, y) of each shape, in caption order."""
    c, n = IMAGE_SIZE / 2, IMAGE_SIZE
    if scene.relation == "alone":
        return [(c, c)]
    near, far = n * 0.28, n * 0.72
    if scene.relation == "above":
        return [(c, near), (c, far)]
    if scene.relation == "below":
        return [(c, far), (c, near)]
    if scene.relation == "left of":
        return [(near, c), (far, c)]
    if scene.relation == "right of":
        return [(far, c), (near, c)]
    steps = [n * 0.19, c, n * 0.81]
    if scene.relation == "row":
        return [(x, c) for x in steps]
    return [(c, y) for y in steps]


def _polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = h if k % 2 == 0 else h * _STAR_INNER_RATIO
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"{shape!r} is not a polygon shape")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB image (flat colours, no anti-aliasing)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    n = len(scene.shapes)
    for spec, (cx, cy) in zip(scene.shapes, _centres(scene), strict=True):
        h = _HALF_EXTENT[n][spec.size]
        fill = COLOURS[spec.colour]
        box = (cx - h, cy - h, cx + h - 1, cy + h - 1)
        if spec.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif spec.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_polygon(spec.shape, cx - 0.5, cy - 0.5, h), fill=fill)
    return image


# --- sampling scenes ---------------------------------------------------------------------------------

SceneKind = Literal["c2i", "t2i"]
# t2i mix of scenes with one, two and three shapes.
_T2I_SHAPE_COUNT_WEIGHTS = (0.4, 0.4, 0.2)


def sample_scene(rng: random.Random, kind: SceneKind) -> Scene:
    """Draw one scene: c2i scenes hold one shape; t2i scenes one to three."""
    background = rng.choice(list(BACKGROUNDS))
    n = 1 if kind == "c2i" else rng.choices((1, 2, 3), weights=_T2I_SHAPE_COUNT_WEIGHTS)[0]

    def spec(sizes: tuple[str, ...]) -> ShapeSpec:
        return ShapeSpec(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(sizes))

    if n == 1:
        return Scene((spec(SIZES),), "alone", background)
    if n == 2:
        relation: Relation = rng.choice(("above", "below", "left of", "right of"))
        return Scene((spec(SIZES), spec(SIZES)), relation, background)
    return Scene((spec(("small",)), spec(("small",)), spec(("small",))), rng.choice(("row", "column")), background)


def scene_for_class(cid: int, rng: random.Random) -> Scene:
    """A random c2i scene of the given class (size and background drawn from rng)."""
    shape, colour = class_attributes(cid)
    return Scene((ShapeSpec(shape, colour, rng.choice(SIZES)),), "alone", rng.choice(list(BACKGROUNDS)))


def split_scenes(seed: int, count: int, kind: SceneKind) -> list[Scene]:
    """The scenes of one split: scene i depends only on (seed, kind, i)."""
    return [sample_scene(random.Random(f"{GENERATOR_VERSION}/{kind}/{seed}/{i}"), kind) for i in range(count)]


def render_array(scenes: list[Scene]) -> np.ndarray:
    """Render scenes into a uint8 array (N, 64, 64, 3)."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = np.asarray(render(scene))
    return out
