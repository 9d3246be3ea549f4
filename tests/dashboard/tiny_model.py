"""A tiny, servable class-conditional model card with real (random) checkpoints, for dashboard tests.

The dashboard's governance flows need a model the registry can serve (moderations and generations resolve
it); the bundled demo models are not needed for that, so these tests build a 2-layer GPT and a small VQ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml

from generator.llamagen import ModelArgs, VQArgs, build_gpt, build_vq

NAME = "tiny-c2i"
GPT = {"dim": 32, "n_layer": 2, "n_head": 2, "vocab_size": 64, "num_classes": 4, "block_size": 16,
       "multiple_of": 16, "cls_token_num": 1}
VQ = {"codebook_size": 64, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 2], "z_channels": 32,
      "num_res_blocks": 1}
CLASSES = ["red square", "blue circle", "green triangle", "yellow star"]


def _save(module: torch.nn.Module, path: Path) -> str:
    torch.save({"model": module.state_dict()}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tiny_model(models_dir: Path) -> Path:
    """Write `tiny-c2i` (card + checkpoints) under `models_dir`; returns the card path."""
    models_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gpt_sha = _save(build_gpt(ModelArgs(task="c2i", **GPT), device="cpu"), models_dir / "tiny-gpt.pt")
    vq_args = VQArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in VQ.items()})
    vq_sha = _save(build_vq(vq_args, device="cpu"), models_dir / "tiny-vq.pt")
    card = {
        "name": NAME, "version": "0.0.1", "task": "c2i",
        "architecture": {"gpt": GPT, "vq": VQ, "image_size": 8},
        "checkpoints": {"gpt": {"path": "tiny-gpt.pt", "sha256": gpt_sha},
                        "vq": {"path": "tiny-vq.pt", "sha256": vq_sha}},
        "licence": "MIT (test fixture)", "intended_use": "dashboard tests only",
        "class_names": CLASSES,
        "lineage": [{"stage": "stage1", "dataset": {
            "name": "synthetic shapes", "size": 1000, "resolution": 8, "caption_source": "synthetic",
            "captioning_model": "LLaVA (stand-in)", "filters": ["none"],
            "advisories": ["test advisory: captions written by a model"]}}],
        "advisories": ["random weights: images are noise"],
    }
    path = models_dir / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path
