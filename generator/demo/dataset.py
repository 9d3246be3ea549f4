"""Image/caption data sets on disk: the rendered shapes splits and a user's own folder of images.

A split directory holds `images.npy` (uint8 [N, H, W, 3]), `records.jsonl` (one JSON object per image:
caption, class_id, and for shapes the scene) and `manifest.json` (what the lineage on a model card
records). `load_image_set` also reads a plain folder: `photo.png` + `photo.txt` (its caption) pairs, or
`<class name>/<image>` sub-folders for class-conditional training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from generator.demo import shapes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(Exception):
    """A data set folder is missing, empty or malformed."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    captions: list[str]
    class_ids: list[int] | None
    manifest: dict[str, object]
    class_names: list[str] | None = None
    scenes: list[shapes.Scene] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def write_shapes_split(directory: Path, *, kind: shapes.SceneKind, split: str, seed: int, count: int) -> Path:
    """Render one split of the shapes data set into `directory`; returns the directory."""
    scenes = shapes.split_scenes(seed, count, kind)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "images.npy", shapes.render_array(scenes))
    with (directory / "records.jsonl").open("w") as fh:
        for scene in scenes:
            spec = scene.shapes[0]
            cid = shapes.class_id(spec.shape, spec.colour) if len(scene.shapes) == 1 else None
            record = {"caption": shapes.caption(scene), "class_id": cid, "scene": scene.to_dict()}
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    manifest = {
        "name": f"shapes-{kind}",
        "split": split,
        "version": shapes.GENERATOR_VERSION,
        "generator": f"generator.demo.shapes {shapes.GENERATOR_VERSION}",
        "seed": seed,
        "size": count,
        "resolution": shapes.IMAGE_SIZE,
        "caption_source": "programmatic",
        "class_names": list(shapes.CLASS_NAMES),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def _load_split(directory: Path) -> ImageSet:
    images = np.load(directory / "images.npy")
    records = [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines() if line]
    manifest = json.loads((directory / "manifest.json").read_text())
    if len(records) != images.shape[0]:
        raise DatasetError(f"{directory}: {images.shape[0]} images but {len(records)} records")
    ids = [r.get("class_id") for r in records]
    scenes = [shapes.Scene.from_dict(r["scene"]) for r in records] if all("scene" in r for r in records) else None
    return ImageSet(
        images=images,
        captions=[r["caption"] for r in records],
        class_ids=[int(i) for i in ids] if all(i is not None for i in ids) else None,
        manifest=manifest,
        class_names=manifest.get("class_names"),  # type: ignore[arg-type]
        scenes=scenes,
    )


def _to_square(path: Path, size: int) -> np.ndarray:
    """Centre-crop to a square and resize (bicubic) to size x size, as LlamaGen preprocesses images."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _load_folder(directory: Path, image_size: int) -> ImageSet:
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    nested = [p for p in files if p.parent != directory]
    class_names = sorted({p.parent.name for p in nested}) if len(nested) == len(files) else None
    captions = []
    for p in files:
        text_file = p.with_suffix(".txt")
        if text_file.is_file():
            captions.append(" ".join(text_file.read_text().split()))
        elif class_names is not None:
            captions.append(p.parent.name.replace("_", " "))
        else:
            raise DatasetError(f"{p}: no caption file {text_file.name} beside it (and no class sub-folders)")
    images = np.stack([_to_square(p, image_size) for p in files])
    class_ids = [class_names.index(p.parent.name) for p in files] if class_names is not None else None
    manifest = {
        "name": directory.name,
        "version": "folder",
        "size": len(files),
        "resolution": image_size,
        "caption_source": "human",
        "class_names": class_names,
    }
    return ImageSet(images, captions, class_ids, manifest, class_names)


def load_image_set(directory: Path, image_size: int = shapes.IMAGE_SIZE) -> ImageSet:
    """Read a rendered split (has manifest.json) or a folder of images with captions or class sub-folders."""
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    if (directory / "manifest.json").is_file():
        return _load_split(directory)
    return _load_folder(directory, image_size)


def to_tensor_range(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the VQ's input range."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
