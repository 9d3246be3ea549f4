"""The README's sample grid: generated images of the demo models with their numbered prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from generator.registry import GenRequest, LoadedModel

GRID_PROMPTS: tuple[str, ...] = (
    "a large red circle on a white background",
    "a small yellow star on a black background",
    "a large blue triangle on a gray background",
    "a large green square on a white background",
    "a small red star above a large blue circle on a white background",
    "a large orange square to the left of a small purple triangle on a black background",
    "a small green circle below a large yellow star on a gray background",
    "a red circle, a blue square and a green star in a row on a white background",
)
GRID_CLASSES: tuple[int, ...] = (0, 7, 14, 21, 5, 10, 15, 20)
GRID_SEED = 7
SCALE = 2  # tiles are drawn at 2x (nearest neighbour) so the 64 px images read well in a README


@dataclass(frozen=True)
class GridEntry:
    label: str
    model: str
    seed: int


def _tile(image: Image.Image, number: int) -> Image.Image:
    tile = image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, 17, 12), fill=(255, 255, 255))
    draw.text((2, 1), str(number), fill=(0, 0, 0))
    return tile


def sample_grid(t2i: LoadedModel, c2i: LoadedModel, out: Path, columns: int = 8) -> list[GridEntry]:
    """Row 1: t2i images of GRID_PROMPTS; row 2: c2i images of GRID_CLASSES; writes PNG + JSON legend."""
    params_t2i, params_c2i = t2i.sampling_params(), c2i.sampling_params()
    text = t2i.generate([GenRequest(prompt=p, seed=GRID_SEED) for p in GRID_PROMPTS], params_t2i)
    classes = c2i.generate([GenRequest(class_id=c, seed=GRID_SEED) for c in GRID_CLASSES], params_c2i)
    images = [o.images[0] for o in text + classes]
    names = c2i.card.class_names or []
    entries = [GridEntry(p, t2i.card.name, GRID_SEED) for p in GRID_PROMPTS] + [
        GridEntry(f"class {c}: {names[c] if c < len(names) else c}", c2i.card.name, GRID_SEED) for c in GRID_CLASSES
    ]
    side = images[0].width * SCALE
    rows = (len(images) + columns - 1) // columns
    pad = 4
    canvas = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + pad) + pad), (240, 240, 240))
    for i, image in enumerate(images):
        canvas.paste(_tile(image, i + 1), (pad + (i % columns) * (side + pad), pad + (i // columns) * (side + pad)))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    legend = [{"number": i + 1, "label": e.label, "model": e.model, "seed": e.seed} for i, e in enumerate(entries)]
    out.with_suffix(".json").write_text(json.dumps(legend, indent=2) + "\n")
    return entries
