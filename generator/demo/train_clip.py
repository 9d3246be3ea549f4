"""Train the small open_clip model of the demo family contrastively on the shapes captions.

The output concept classifier of the embedded default loads it with the plain open_clip API:
`open_clip.add_model_config(<clip_config.json>)` registers the architecture under the name
`clip_config` (open_clip names a config by its file stem), then
`open_clip.create_model_and_transforms("clip_config", pretrained=<clip.pt>)`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generator.demo import shapes
from generator.demo.config import CLIP_SCHEDULE, SEED, TrainSchedule
from generator.demo.dataset import load_image_set
from generator.demo.training import batch_indices, train

log = logging.getLogger(__name__)

CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    # A small ModifiedResNet image tower (open_clip builds one when `layers` is a list): convolutions learn
    # flat colours and silhouettes from scratch far faster than a ViT of the same cost.
    "vision_cfg": {"image_size": shapes.IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def model_name(config_path: Path) -> str:
    """The name open_clip registers a config file under: its file stem."""
    return config_path.stem


def build_clip(config_path: Path) -> tuple[nn.Module, Any]:
    """A randomly initialised model of the config at config_path, and its tokenizer."""
    open_clip.add_model_config(config_path)
    name = model_name(config_path)
    model = open_clip.create_model(name, pretrained=None)
    return model, open_clip.get_tokenizer(name)


def preprocess(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (B, 64, 64, 3) -> normalised float (B, 3, 64, 64), as open_clip's eval transform at 64 px."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def concept_phrases(scene: shapes.Scene, rng: random.Random) -> str:
    """A short phrase naming one shape of the scene ("a red star", "a star", "a red shape")."""
    spec = rng.choice(scene.shapes)
    phrase = rng.choice([f"{spec.colour} {spec.shape}", spec.shape, f"{spec.colour} shape"])
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def multi_positive_loss(image_features: Tensor, text_features: Tensor, scale: Tensor, texts: list[str]) -> Tensor:
    """Symmetric InfoNCE where every caption equal to a row's caption counts as a positive for that row."""
    logits = scale * image_features @ text_features.t()  # (B, B)
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def train_clip(
    data_dir: Path,
    run_dir: Path,
    out_path: Path,
    config_path: Path,
    *,
    schedule: TrainSchedule = CLIP_SCHEDULE,
    seed: int = SEED,
    concept_share: float = 0.4,
) -> nn.Module:
    """Train on the images and captions of data_dir; for shapes data a share of captions name one concept."""
    data = load_image_set(data_dir)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(CLIP_CONFIG, indent=2) + "\n")
    torch.manual_seed(seed)
    model, tokenizer = build_clip(config_path)
    images = torch.from_numpy(data.images)
    log.info("CLIP: %d parameters, %d training images", sum(p.numel() for p in model.parameters()), len(data))

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        idx = batch_indices(len(images), schedule.batch_size, generator).tolist()
        rng = random.Random(f"{seed}/{step}")
        texts = [
            concept_phrases(data.scenes[i], rng) if data.scenes and rng.random() < concept_share else data.captions[i]
            for i in idx
        ]
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer does
        image_features = model.encode_image(preprocess(images[idx]), normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
        return multi_positive_loss(image_features, text_features, model.logit_scale.exp(), texts)

    train(name="train-clip", run_dir=run_dir, model=model, schedule=schedule, seed=seed, loss_fn=loss_fn)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().half() for k, v in model.state_dict().items()}, out_path)
    log.info("CLIP weights written to %s (open_clip name %r)", out_path, model_name(config_path))
    return model


def load_clip(config_path: Path, weights: Path) -> tuple[nn.Module, Any]:
    """The shipped CLIP and its tokenizer, loaded exactly as the concept classifier loads them."""
    open_clip.add_model_config(config_path)
    name = model_name(config_path)
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    return model.eval(), open_clip.get_tokenizer(name)


USAGE_NOTES = """# Demo CLIP (open_clip model name `{name}`)

A small open_clip model trained contrastively on the shapes captions by
`python -m generator.demo train-clip` (seed {seed}): a small ModifiedResNet image tower (width {width},
{layers} bottleneck stages, 64 px images) and a {text_layers}-layer text tower (context {context}).
A share of the training captions were cut down to one concept ("a red star", "a star", "a red shape"),
so single-concept prompts work for the output concept classifier. Weights are stored in float16 and load
as float32.

Load it offline with the plain open_clip API:

```python
import open_clip
open_clip.add_model_config("{config}")  # registers the name "{name}" (open_clip uses the file stem)
model, _, preprocess = open_clip.create_model_and_transforms("{name}", pretrained="{weights}")
tokenizer = open_clip.get_tokenizer("{name}")
```

Inputs are 64x64 RGB (`preprocess` resizes other sizes). The measured zero-shot accuracy is on the card
`models/demo-shapes-t2i.yaml` (`metrics.clip_zero_shot_accuracy`).
"""


def write_usage_notes(path: Path, config_path: Path, weights: Path) -> None:
    """Write CLIP.md: the exact open_clip name and loading code for the concept classifier."""
    vision, text = CLIP_CONFIG["vision_cfg"], CLIP_CONFIG["text_cfg"]
    path.write_text(
        USAGE_NOTES.format(
            name=model_name(config_path),
            seed=SEED,
            width=vision["width"],
            layers=len(vision["layers"]),
            text_layers=text["layers"],
            context=text["context_length"],
            config=config_path.as_posix(),
            weights=weights.as_posix(),
        )
    )
