"""The demo family's commands end to end at toy sizes: data -> VQ -> GPTs -> CLIP -> cards -> registry -> metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from generator.demo import evaluate
from generator.demo.cards import set_metrics, write_all_cards
from generator.demo.config import MINILM_LAYERS, DemoPaths, TrainSchedule
from generator.demo.dataset import load_image_set, write_shapes_split
from generator.demo.grid import GRID_CLASSES, GRID_PROMPTS, sample_grid
from generator.demo.train_clip import load_clip, train_clip, write_usage_notes
from generator.demo.train_gpt import train_c2i, train_t2i
from generator.demo.train_vq import train_vq
from generator.llamagen import ModelArgs, VQArgs, load_vq
from generator.registry import GenRequest, Registry

TINY_STEPS = TrainSchedule(steps=2, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=1)
TINY_VQ = VQArgs(codebook_size=32, codebook_embed_dim=4, ch=32, ch_mult=(1, 1, 1, 1), z_channels=32, num_res_blocks=1)
TINY_GPT = {"dim": 32, "n_layer": 1, "n_head": 2, "multiple_of": 16, "vocab_size": 32, "block_size": 64}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """A complete toy family (every command's output) under a temporary models dir."""
    root = tmp_path_factory.mktemp("demo")
    paths = DemoPaths(models_dir=root / "models", work_dir=root / "work")
    for kind, split, count in (
        ("t2i", "train", 24),
        ("t2i", "heldout", 8),
        ("c2i", "train", 24),
        ("c2i", "heldout", 8),
    ):
        write_shapes_split(paths.data_dir(kind, split), kind=kind, split=split, seed=5, count=count)  # type: ignore[arg-type]
    vq_path = paths.model_file("vq")
    train_vq(
        paths.data_dir("t2i", "train"), paths.run_dir("vq"), vq_path, schedule=TINY_STEPS, args=TINY_VQ, ae_warmup=1
    )
    vq = load_vq(vq_path, model=TINY_VQ, device="cpu")
    c2i_args = ModelArgs(**TINY_GPT, task="c2i", num_classes=24)  # type: ignore[arg-type]
    t2i_args = ModelArgs(**TINY_GPT, task="t2i", caption_dim=384, caption_len=24, cls_token_num=24)  # type: ignore[arg-type]
    train_c2i(
        paths.data_dir("c2i", "train"),
        vq,
        vq_path,
        paths.run_dir("c2i"),
        paths.model_file("c2i"),
        schedule=TINY_STEPS,
        args=c2i_args,
    )
    train_t2i(
        paths.data_dir("t2i", "train"),
        vq,
        vq_path,
        paths.run_dir("t2i"),
        paths.model_file("t2i"),
        schedule=TINY_STEPS,
        args=t2i_args,
    )
    train_clip(
        paths.data_dir("t2i", "train"),
        paths.run_dir("clip"),
        paths.model_file("clip"),
        paths.model_file("clip_config"),
        schedule=TINY_STEPS,
    )
    write_all_cards(paths)
    Registry.clear_cache()
    return paths


def test_cards_pin_the_sha256_of_the_written_checkpoints(family: DemoPaths) -> None:
    from generator.llamagen import sha256_file

    card = Registry(family.models_dir).get("demo-shapes-t2i")
    assert card.checkpoints.gpt.sha256 == sha256_file(family.model_file("t2i"))
    assert card.checkpoints.vq.sha256 == sha256_file(family.model_file("vq"))


def test_cards_record_the_architecture_stored_with_the_weights(family: DemoPaths) -> None:
    card = Registry(family.models_dir).get("demo-shapes-c2i")
    assert isinstance(card.architecture.gpt, dict) and card.architecture.gpt["dim"] == TINY_GPT["dim"]
    assert isinstance(card.architecture.vq, dict) and card.architecture.vq["codebook_size"] == TINY_VQ.codebook_size


def test_demo_lineage_names_the_programmatic_dataset_generator_and_seed(family: DemoPaths) -> None:
    stage = Registry(family.models_dir).get("demo-shapes-t2i").lineage[-1]
    assert stage.dataset.caption_source == "programmatic"
    assert stage.dataset.generator and "shapes" in stage.dataset.generator
    assert stage.dataset.seed == 5 and stage.dataset.resolution == 64 and stage.dataset.size == 24


def test_demo_lineage_says_in_which_precision_each_stage_trained(family: DemoPaths) -> None:
    t2i = Registry(family.models_dir).get("demo-shapes-t2i").lineage
    c2i = Registry(family.models_dir).get("demo-shapes-c2i").lineage
    assert t2i[-1].notes.endswith("bf16 autocast over float32 weights")  # T2I_SCHEDULE.bf16
    assert c2i[-1].notes.endswith(", float32") and "float32;" in t2i[0].notes  # the GPT and the tokenizer


def test_t2i_card_encodes_captions_with_the_minilm_layers_its_training_used(family: DemoPaths) -> None:
    from generator.llamagen.loading import read_checkpoint

    trained_with = read_checkpoint(family.model_file("t2i"))["text_encoder"]
    card = Registry(family.models_dir).get("demo-shapes-t2i")
    assert card.architecture.text_encoder is not None
    assert card.architecture.text_encoder.layers == trained_with["layers"] == MINILM_LAYERS
    model = Registry(family.models_dir).load("demo-shapes-t2i", "cpu")
    assert model.text_encoder is not None and model.text_encoder.layers == MINILM_LAYERS  # type: ignore[attr-defined]


def test_t2i_weights_saved_before_the_encoder_was_recorded_get_a_card_with_all_minilm_layers(
    family: DemoPaths, tmp_path: Path
) -> None:
    import shutil

    from generator.demo.cards import demo_card
    from generator.llamagen.loading import read_checkpoint

    old = DemoPaths(models_dir=tmp_path / "models", work_dir=family.work_dir)
    shutil.copytree(family.models_dir, old.models_dir)
    record = read_checkpoint(old.model_file("t2i"))
    del record["text_encoder"]
    rewritten = old.model_file("t2i").with_suffix(".new")  # not in place: the record's tensors map the old file
    torch.save(record, rewritten)
    rewritten.replace(old.model_file("t2i"))
    encoder = demo_card("t2i", old).architecture.text_encoder
    assert encoder is not None and (encoder.kind, encoder.max_len, encoder.layers) == ("minilm", 24, None)


def test_registry_serves_the_trained_t2i_model_as_64px_images(family: DemoPaths) -> None:
    model = Registry(family.models_dir).load("demo-shapes-t2i", "cpu")
    (out,) = model.generate([GenRequest(prompt="a large red circle on a white background", seed=1, num_images=2)])
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]
    assert out.tokens == 2 * 64


def test_every_official_card_is_written_and_not_servable_without_weights(family: DemoPaths) -> None:
    cards = {c.name: c for c in Registry(family.models_dir).cards()}
    official = [c for name, c in cards.items() if name.startswith("llamagen-")]
    assert len(official) == 9
    assert not any(c.servable for c in official)


def test_evaluate_writes_metrics_with_targets_onto_the_card(family: DemoPaths) -> None:
    model = Registry(family.models_dir).load("demo-shapes-c2i", "cpu")
    metrics = evaluate.evaluate_c2i(model, per_class=1)
    card = set_metrics(family.models_dir / "demo-shapes-c2i.yaml", metrics)
    Registry.clear_cache()
    accuracy = card.metrics["c2i_attribute_accuracy"]
    assert 0.0 <= accuracy.value <= 1.0 and accuracy.target == 0.9 and accuracy.samples == 24


def test_vq_metrics_report_reconstruction_error_on_the_heldout_split(family: DemoPaths) -> None:
    vq = load_vq(family.model_file("vq"), model=TINY_VQ, device="cpu")
    metrics = evaluate.evaluate_vq(vq, load_image_set(family.data_dir("t2i", "heldout")))
    assert metrics["vq_reconstruction_mse"].value >= 0 and metrics["vq_reconstruction_mse"].samples == 8
    assert not metrics["vq_reconstruction_mse"].higher_is_better


def test_clip_loads_through_plain_open_clip_and_scores_zero_shot(family: DemoPaths) -> None:
    model, tokenizer = load_clip(family.model_file("clip_config"), family.model_file("clip"))
    with torch.no_grad():
        features = model.encode_text(tokenizer(["a red star"]), normalize=True)
    assert features.shape == (1, 128)
    metrics = evaluate.evaluate_clip(
        family.model_file("clip_config"),
        family.model_file("clip"),
        load_image_set(family.data_dir("c2i", "heldout")),
        load_image_set(family.data_dir("t2i", "heldout")),
    )
    assert metrics["clip_zero_shot_accuracy"].target == 0.9


def test_clip_usage_notes_name_the_open_clip_model(family: DemoPaths, tmp_path: Path) -> None:
    notes = tmp_path / "CLIP.md"
    write_usage_notes(notes, family.model_file("clip_config"), family.model_file("clip"))
    assert 'create_model_and_transforms("clip_config"' in notes.read_text()


def test_sample_grid_writes_a_png_and_its_numbered_legend(family: DemoPaths) -> None:
    registry = Registry(family.models_dir)
    out = family.models_dir / "demo" / "samples.png"
    sample_grid(registry.load("demo-shapes-t2i", "cpu"), registry.load("demo-shapes-c2i", "cpu"), out)
    legend = json.loads(out.with_suffix(".json").read_text())
    assert len(legend) == len(GRID_PROMPTS) + len(GRID_CLASSES)
    assert legend[0] == {"number": 1, "label": GRID_PROMPTS[0], "model": "demo-shapes-t2i", "seed": 7}
    with Image.open(out) as image:
        assert image.width > image.height > 0
