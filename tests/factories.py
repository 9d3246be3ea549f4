"""Builders for tests: tiny random-weight LlamaGen models with real cards, loaded through the real registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from generator.llamagen import ModelArgs, VQArgs, build_gpt, build_vq, save_checkpoint, sha256_file

TINY_VQ: dict[str, Any] = {"codebook_size": 64, "codebook_embed_dim": 8, "ch": 32, "ch_mult": [1, 1, 1],
                           "z_channels": 32, "num_res_blocks": 1}
TINY_GPT: dict[str, Any] = {"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "num_classes": 10,
                            "block_size": 16, "multiple_of": 32}
LINEAGE = [{"stage": "test", "dataset": {"name": "random-init", "size": 0, "resolution": 16,
                                         "caption_source": "programmatic", "generator": "tests/factories.py",
                                         "seed": 0}}]


def write_tiny_model(models_dir: Path, name: str, task: str, seed: int = 0) -> Path:
    """A tiny c2i or t2i model (random weights) with its card; returns the card path."""
    torch.manual_seed(seed)
    gpt_spec = dict(TINY_GPT)
    text_encoder = None
    if task == "t2i":
        gpt_spec.update(caption_dim=384, cls_token_num=8, caption_len=8)
        text_encoder = {"kind": "minilm", "max_len": 8}
    gpt = build_gpt(ModelArgs(task=task, **gpt_spec), task, device="cpu")
    vq = build_vq(VQArgs.from_dict(TINY_VQ), device="cpu")
    with torch.no_grad():  # the official head starts at zero, which would make every token equally likely
        gpt.output.weight.normal_(0, 0.5)
    weights = models_dir / "tiny"
    weights.mkdir(parents=True, exist_ok=True)
    save_checkpoint(gpt, weights / f"{name}.pt")
    save_checkpoint(vq, weights / f"{name}-vq.pt")
    card = {
        "name": name, "version": "0.0.1", "task": task,
        "architecture": {"gpt": gpt_spec, "vq": TINY_VQ, "image_size": 16,
                         **({"text_encoder": text_encoder} if text_encoder else {})},
        "checkpoints": {"gpt": {"path": f"tiny/{name}.pt", "sha256": sha256_file(weights / f"{name}.pt")},
                        "vq": {"path": f"tiny/{name}-vq.pt", "sha256": sha256_file(weights / f"{name}-vq.pt")}},
        "licence": "test only", "intended_use": "tests",
        "defaults": {"cfg_scale": 2.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0},
        "lineage": LINEAGE,
    }
    if task == "c2i":
        card["class_names"] = [f"class {i}" for i in range(TINY_GPT["num_classes"])]
    path = models_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


class RecordingDispatcher:
    """A dispatcher that only records what it was sent: jobs stay queued until a test runs them."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def submit(self, job_id: str) -> None:
        self.sent.append(job_id)

    def ping(self) -> None:
        return None

    def workers(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        return None


def submit_c2i(state: Any, class_id: int, seed: int, **params: Any) -> str:
    """Submit a tiny-c2i generation as a design-team creator; returns the job id."""
    from gateway.auth import Principal
    from gateway.schemas import GenerationCreate
    from gateway.services import submit_generation

    request = GenerationCreate.model_validate({"model": "tiny-c2i", "class_id": class_id,
                                               "params": {"seed": seed, **params}})
    principal = Principal(key_id="k-test", role="creator", team="design")
    return submit_generation(state=state, principal=principal, request=request, request_id="test").id
