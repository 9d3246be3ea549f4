"""The analytic checker that judges generated images against the renderer's ground truth."""

from __future__ import annotations

import numpy as np

from generator.demo import shapes
from generator.demo.checker import detect, matches
from generator.demo.shapes import Scene, ShapeSpec, render


def test_checker_agrees_with_the_renderer_on_every_rendered_scene() -> None:
    scenes = shapes.split_scenes(11, 150, "t2i") + shapes.split_scenes(12, 50, "c2i")
    assert all(matches(render(s), s) for s in scenes)


def test_checker_names_each_kind_of_shape() -> None:
    for kind in shapes.SHAPES:
        (found,) = detect(render(Scene((ShapeSpec(kind, "red", "large"),), "alone", "white")))
        assert (found.shape, found.colour) == (kind, "red")


def test_checker_rejects_a_shape_of_the_wrong_colour() -> None:
    drawn = Scene((ShapeSpec("star", "blue", "large"),), "alone", "white")
    asked = Scene((ShapeSpec("star", "red", "large"),), "alone", "white")
    assert not matches(render(drawn), asked)


def test_checker_rejects_an_image_missing_a_requested_shape() -> None:
    drawn = Scene((ShapeSpec("circle", "red", "small"),), "alone", "white")
    asked = Scene((ShapeSpec("circle", "red", "small"), ShapeSpec("square", "blue", "small")), "above", "white")
    assert not matches(render(drawn), asked)


def test_checker_ignores_specks_smaller_than_a_shape() -> None:
    pixels = np.asarray(render(Scene((ShapeSpec("square", "green", "large"),), "alone", "white"))).copy()
    pixels[2:4, 2:4] = shapes.COLOURS["red"]
    assert [(d.shape, d.colour) for d in detect(pixels)] == [("square", "green")]


def test_checker_finds_nothing_on_a_blank_background() -> None:
    assert detect(np.full((64, 64, 3), 255, dtype=np.uint8)) == []
