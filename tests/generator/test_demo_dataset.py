"""Data sets on disk: rendered splits, and a user's folder of images with captions or class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator.demo.dataset import DatasetError, load_image_set, write_shapes_split


def _image(path: Path, size: tuple[int, int] = (80, 60), colour: tuple[int, int, int] = (200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_rendered_split_round_trips_images_captions_and_manifest(tmp_path: Path) -> None:
    write_shapes_split(tmp_path / "s", kind="c2i", split="train", seed=9, count=6)
    data = load_image_set(tmp_path / "s")
    assert data.images.shape == (6, 64, 64, 3) and data.images.dtype == np.uint8
    assert len(data.captions) == 6 and data.class_ids is not None and data.scenes is not None
    assert data.manifest["caption_source"] == "programmatic" and data.manifest["seed"] == 9


def test_t2i_split_has_no_class_ids_when_scenes_hold_several_shapes(tmp_path: Path) -> None:
    write_shapes_split(tmp_path / "s", kind="t2i", split="train", seed=0, count=40)
    assert load_image_set(tmp_path / "s").class_ids is None


def test_folder_of_images_with_caption_files_loads_centre_cropped(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red  picture\n")
    data = load_image_set(tmp_path, image_size=32)
    assert data.images.shape == (1, 32, 32, 3) and data.captions == ["a red picture"]
    assert data.class_ids is None


def test_class_sub_folders_give_class_ids_and_names(tmp_path: Path) -> None:
    _image(tmp_path / "cats" / "1.jpg")
    _image(tmp_path / "dogs" / "2.jpg")
    data = load_image_set(tmp_path, image_size=16)
    assert data.class_names == ["cats", "dogs"] and data.class_ids == [0, 1]


def test_image_without_caption_file_is_an_error_naming_it(tmp_path: Path) -> None:
    _image(tmp_path / "lonely.png")
    with pytest.raises(DatasetError, match="lonely.png: no caption file lonely.txt"):
        load_image_set(tmp_path)


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images"):
        load_image_set(tmp_path)
