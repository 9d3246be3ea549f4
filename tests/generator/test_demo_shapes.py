"""The shapes data set: deterministic scenes, programmatic captions, class ids and the renderer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from generator.demo import shapes
from generator.demo.shapes import COLOURS, Scene, ShapeSpec, caption, render


def test_split_is_a_pure_function_of_seed_and_index() -> None:
    assert shapes.split_scenes(3, 20, "t2i") == shapes.split_scenes(3, 20, "t2i")
    assert shapes.split_scenes(3, 20, "t2i")[:5] == shapes.split_scenes(3, 5, "t2i")


def test_different_seeds_give_different_splits() -> None:
    assert shapes.split_scenes(3, 20, "t2i") != shapes.split_scenes(4, 20, "t2i")


def test_c2i_scenes_hold_one_shape_and_t2i_scenes_one_to_three() -> None:
    assert {len(s.shapes) for s in shapes.split_scenes(0, 200, "c2i")} == {1}
    assert {len(s.shapes) for s in shapes.split_scenes(0, 200, "t2i")} == {1, 2, 3}


def test_caption_names_both_shapes_in_order_with_their_relation() -> None:
    scene = Scene((ShapeSpec("star", "red", "small"), ShapeSpec("circle", "blue", "large")), "above", "white")
    assert caption(scene) == "a small red star above a large blue circle on a white background"


def test_caption_uses_an_before_a_vowel() -> None:
    scene = Scene((ShapeSpec("square", "orange", "small"),) * 3, "row", "gray")
    assert caption(scene) == "an orange square, an orange square and an orange square in a row on a gray background"


def test_class_ids_round_trip_through_shape_and_colour() -> None:
    for cid, name in enumerate(shapes.CLASS_NAMES):
        shape, colour = shapes.class_attributes(cid)
        assert shapes.class_id(shape, colour) == cid and name == f"{colour} {shape}"


def test_class_id_outside_the_classes_is_rejected() -> None:
    with pytest.raises(ValueError, match="class id 24 is outside 0..23"):
        shapes.class_attributes(24)


def test_render_paints_the_shape_colour_at_the_centre_on_the_background() -> None:
    pixels = np.asarray(render(Scene((ShapeSpec("square", "green", "large"),), "alone", "black")))
    assert pixels.shape == (64, 64, 3)
    assert tuple(pixels[32, 32]) == COLOURS["green"] and tuple(pixels[0, 0]) == (0, 0, 0)


def test_shape_above_another_is_drawn_in_the_upper_half() -> None:
    scene = Scene((ShapeSpec("circle", "red", "small"), ShapeSpec("square", "blue", "small")), "above", "white")
    pixels = np.asarray(render(scene))
    red_rows = np.where((pixels == COLOURS["red"]).all(-1))[0]
    blue_rows = np.where((pixels == COLOURS["blue"]).all(-1))[0]
    assert red_rows.max() < 32 <= blue_rows.min()


def test_scene_for_class_draws_that_class() -> None:
    scene = shapes.scene_for_class(shapes.class_id("star", "purple"), random.Random(0))
    assert (scene.shapes[0].shape, scene.shapes[0].colour) == ("star", "purple")


def test_scene_dict_round_trips() -> None:
    scene = shapes.split_scenes(1, 1, "t2i")[0]
    assert Scene.from_dict(scene.to_dict()) == scene
