"""The analytic checker that judges generated images against the renderer's ground truth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

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


def _softened(scene: Scene, radius: float = 0.8) -> Image.Image:
    return render(scene).filter(ImageFilter.GaussianBlur(radius))


def test_checker_judges_shapes_and_colours_not_edge_sharpness() -> None:
    # Soft edges blend neighbouring colours (red beside yellow gives orange) and fill a star's notches; a
    # decoder's output looks like this, and the shapes in it are still the requested ones.
    scenes = shapes.split_scenes(13, 120, "t2i")
    assert all(matches(_softened(s), s) for s in scenes)


def test_checker_still_rejects_wrong_colours_and_wrong_shapes_when_edges_are_soft() -> None:
    for s in shapes.split_scenes(14, 60, "t2i"):
        first = s.shapes[0]
        other_colour = next(c for c in shapes.COLOURS if c != first.colour)
        other_shape = next(k for k in shapes.SHAPES if k != first.shape)
        for wrong in (replace(first, colour=other_colour), replace(first, shape=other_shape)):
            drawn = replace(s, shapes=(wrong, *s.shapes[1:]))
            assert not matches(_softened(drawn), s), (drawn, s)


def test_a_thin_band_of_a_third_colour_is_not_a_shape() -> None:
    pixels = np.asarray(render(Scene((ShapeSpec("square", "green", "large"),), "alone", "white"))).copy()
    pixels[5:7, 4:60] = shapes.COLOURS["orange"]  # 2 px x 56 px: larger than a speck, but no core
    assert [(d.shape, d.colour) for d in detect(pixels)] == [("square", "green")]
