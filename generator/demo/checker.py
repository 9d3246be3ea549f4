"""An analytic shape detector, independent of every trained model, that judges generated images.

Pixels are snapped to the nearest named colour; the background is the commonest colour on the border;
each connected region of a shape colour that has a solid core is one shape, named by two scale-free
measurements of its silhouette: how much of its convex hull it fills (solidity: star 0.56, the others
0.9-1.0) and how much of its bounding box it fills (square 1.0, circle 0.79, triangle 0.5).

Both measurements keep their margins when edges are soft: under a 1.2 px Gaussian blur a star's solidity
rises to about 0.7 and a square's fill falls to about 0.95. Thin bands of a third colour where two colours
meet (red beside yellow blends to orange) have no core, so they are not counted as shapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from generator.demo.shapes import BACKGROUNDS, COLOURS, Scene

_NAMES = list(COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)  # (K, 3)
# Pixels farther than this (RGB Euclidean) from every named colour count as no colour at all.
_MAX_COLOUR_DISTANCE = 90.0
# Regions smaller than this share of the image are noise, not shapes.
_MIN_AREA_FRACTION = 0.006
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# A shape keeps at least this share of its pixels when eroded by one pixel (small stars, the thinnest,
# keep 0.33-0.41 sharp or under a 0.8 px blur); a band one or two pixels wide keeps none.
_MIN_CORE_FRACTION = 0.15
_STAR_MAX_SOLIDITY = 0.82
_SQUARE_MIN_FILL = 0.88
_CIRCLE_MIN_FILL = 0.65


@dataclass(frozen=True)
class DetectedShape:
    shape: str
    colour: str
    area: int
    bbox: tuple[int, int, int, int]  # (top, left, bottom, right), exclusive bottom/right
    fill: float
    solidity: float


def _colour_labels(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index into _NAMES, or -1 where no named colour is near."""
    dist = np.linalg.norm(pixels[:, :, None, :].astype(np.float32) - _PALETTE[None, None], axis=-1)
    labels = dist.argmin(axis=-1)
    labels[dist.min(axis=-1) > _MAX_COLOUR_DISTANCE] = -1
    return labels


def _background(labels: np.ndarray) -> int:
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    counts = Counter(int(v) for v in border if v >= 0)
    return counts.most_common(1)[0][0] if counts else -1


def _solidity(mask: np.ndarray) -> float:
    """Share of the convex hull of the region's pixel squares that the region covers."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([ys + dy, xs + dx], axis=1) for dy in (0, 1) for dx in (0, 1)])
    return float(mask.sum() / ConvexHull(corners).volume)  # a 2-D hull's "volume" is its area


def _shape_name(fill: float, solidity: float) -> str:
    if solidity < _STAR_MAX_SOLIDITY:
        return "star"
    if fill >= _SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= _CIRCLE_MIN_FILL else "triangle"


def detect(image: Image.Image | np.ndarray) -> list[DetectedShape]:
    """Find the shapes in an image, largest first."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = _colour_labels(pixels)
    background = _background(labels)
    min_area = max(4, int(_MIN_AREA_FRACTION * labels.size))
    found: list[DetectedShape] = []
    for k, name in enumerate(_NAMES):
        if name not in COLOURS or k == background:
            continue
        regions, count = ndimage.label(labels == k, structure=_EIGHT_CONNECTED)
        for region_slice, index in zip(ndimage.find_objects(regions), range(1, count + 1), strict=True):
            mask = regions[region_slice] == index
            area = int(mask.sum())
            if area < min_area:
                continue
            core = ndimage.binary_erosion(mask, structure=_EIGHT_CONNECTED, border_value=0)
            if core.sum() < _MIN_CORE_FRACTION * area:
                continue
            height, width = mask.shape
            fill = area / (height * width)
            solidity = _solidity(mask)
            top, left = region_slice[0].start, region_slice[1].start
            found.append(
                DetectedShape(
                    shape=_shape_name(fill, solidity),
                    colour=name,
                    area=area,
                    bbox=(top, left, top + height, left + width),
                    fill=fill,
                    solidity=solidity,
                )
            )
    return sorted(found, key=lambda d: -d.area)


def requested(scene: Scene) -> Counter[tuple[str, str]]:
    """The (colour, shape) pairs a scene asks for, as a multiset."""
    return Counter((s.colour, s.shape) for s in scene.shapes)


def matches(image: Image.Image | np.ndarray, scene: Scene) -> bool:
    """True when the image holds exactly the requested shapes, each in its requested colour."""
    return Counter((d.colour, d.shape) for d in detect(image)) == requested(scene)
