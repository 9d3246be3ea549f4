"""Train the demo LlamaGen GPTs on VQ tokens: class-conditional (c2i) and MiniLM-captioned (t2i)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from generator.demo.config import (
    C2I_ARGS,
    C2I_SCHEDULE,
    MINILM_LAYERS,
    SEED,
    T2I_ARGS,
    T2I_SCHEDULE,
    TrainSchedule,
)
from generator.demo.dataset import DatasetError, ImageSet, load_image_set
from generator.demo.train_vq import images_to_input
from generator.demo.training import batch_indices, train
from generator.llamagen import ModelArgs, Transformer, VQModel, build_gpt, save_checkpoint
from generator.llamagen.loading import sha256_file

log = logging.getLogger(__name__)

ENCODE_BATCH = 256


def demo_gpt_args(task: str, overrides: dict[str, object] | None = None) -> ModelArgs:
    base = C2I_ARGS if task == "c2i" else T2I_ARGS
    return ModelArgs(**{**base, **(overrides or {})})  # type: ignore[arg-type]


def save_half(model: nn.Module, path: Path, **extra: Any) -> None:
    """Write the weights in float16 (half the bytes in git; they are loaded back as float32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(copy.deepcopy(model).half(), path, **extra)


def tokenize(vq: VQModel, images: np.ndarray, cache: Path | None = None, vq_digest: str | None = None) -> Tensor:
    """VQ codes int64 [N, h*w] of uint8 images [N, H, W, 3]; cached on disk per (VQ digest, images digest)."""
    key = None
    if cache is not None and vq_digest is not None:
        key = {"vq_sha256": vq_digest, "images_sha256": hashlib.sha256(images.tobytes()).hexdigest()}
        meta_path = cache.with_suffix(".json")
        if cache.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == key:
            return torch.from_numpy(np.load(cache)).long()
    codes = torch.cat(
        [vq.encode(images_to_input(images[i : i + ENCODE_BATCH])) for i in range(0, len(images), ENCODE_BATCH)]
    )
    if cache is not None and key is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, codes.numpy().astype(np.int32))
        cache.with_suffix(".json").write_text(json.dumps(key))
    return codes.long()


def encode_captions(captions: list[str], encoder: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Unique captions -> (float16 features [U, L, 384], bool mask [U, L], index [N] into them)."""
    unique = sorted(set(captions))
    position = {c: i for i, c in enumerate(unique)}
    feats, masks = [], []
    for i in range(0, len(unique), ENCODE_BATCH):
        emb, mask = encoder.encode(unique[i : i + ENCODE_BATCH])
        feats.append(emb.to(torch.float16).cpu())
        masks.append(mask.bool().cpu())
    index = torch.tensor([position[c] for c in captions], dtype=torch.long)
    return torch.cat(feats), torch.cat(masks), index


def _load_tokens(vq: VQModel, vq_path: Path, data: ImageSet, cache: Path) -> Tensor:
    codes = tokenize(vq, data.images, cache, sha256_file(vq_path)).long()
    log.info("%d images tokenized into %s codes each", len(codes), codes.shape[1])
    return codes


def train_c2i(
    data_dir: Path,
    vq: VQModel,
    vq_path: Path,
    run_dir: Path,
    out_path: Path,
    *,
    schedule: TrainSchedule = C2I_SCHEDULE,
    args: ModelArgs | None = None,
    seed: int = SEED,
) -> Transformer:
    """Class-conditional GPT on (class id, VQ codes) pairs; the null class is args.num_classes."""
    data = load_image_set(data_dir)
    if data.class_ids is None:
        raise DatasetError(f"{data_dir}: c2i training needs a class id per image (class sub-folders)")
    args = args or demo_gpt_args("c2i", {"num_classes": len(data.class_names or [])} if data.class_names else None)
    codes = _load_tokens(vq, vq_path, data, run_dir / "tokens.npy")
    labels = torch.tensor(data.class_ids, dtype=torch.long)
    torch.manual_seed(seed)
    gpt = build_gpt(args, device="cpu")

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        idx = batch_indices(len(codes), schedule.batch_size, generator)
        tokens = codes[idx]
        return gpt.forward_train(labels[idx], tokens[:, :-1], targets=tokens)[1]  # type: ignore[return-value]

    return _train_and_save("train-c2i", gpt, args, schedule, seed, loss_fn, run_dir, out_path)


def train_t2i(
    data_dir: Path,
    vq: VQModel,
    vq_path: Path,
    run_dir: Path,
    out_path: Path,
    *,
    schedule: TrainSchedule = T2I_SCHEDULE,
    args: ModelArgs | None = None,
    seed: int = SEED,
    caption_layers: int | None = MINILM_LAYERS,
) -> Transformer:
    """Text-conditional GPT: MiniLM token features, left-padded and zeroed, through the caption MLP.

    caption_layers: the features are MiniLM's token states after that many layers (None: all); the number is
    stored beside the weights, and the model card's text encoder must use the same.
    """
    from generator.text import MiniLMCaptionEncoder

    data = load_image_set(data_dir)
    args = args or demo_gpt_args("t2i")
    codes = _load_tokens(vq, vq_path, data, run_dir / "tokens.npy")
    encoder = MiniLMCaptionEncoder(max_len=args.caption_len, device="cpu", layers=caption_layers)
    feats, masks, index = encode_captions(data.captions, encoder)
    log.info("%d captions (%d distinct) encoded with MiniLM", len(index), len(feats))
    torch.manual_seed(seed)
    gpt = build_gpt(args, device="cpu")

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        idx = batch_indices(len(codes), schedule.batch_size, generator)
        tokens, rows = codes[idx], index[idx]
        cond = feats[rows].float()
        return gpt.forward_train(cond, tokens[:, :-1], targets=tokens, mask=masks[rows])[1]  # type: ignore[return-value]

    return _train_and_save("train-t2i", gpt, args, schedule, seed, loss_fn, run_dir, out_path,
                           text_encoder={"kind": "minilm", "max_len": encoder.max_len, "layers": caption_layers})


def _train_and_save(name: str, gpt: Transformer, args: ModelArgs, schedule: TrainSchedule, seed: int,
                    loss_fn: Callable[[int, torch.Generator], Tensor], run_dir: Path, out_path: Path,
                    **record: Any) -> Transformer:
    """Run the resumable training loop, then write the float16 weights with their training record."""
    train(name=name, run_dir=run_dir, model=gpt, schedule=schedule, seed=seed, loss_fn=loss_fn)
    save_half(gpt, out_path, args=_plain(args), steps=schedule.last_step, schedule_steps=schedule.steps,
              batch_size=schedule.batch_size, seed=seed, **record)
    log.info("%s weights written to %s", name, out_path)
    return gpt


def _plain(args: ModelArgs) -> dict[str, object]:
    return {k: v for k, v in asdict(args).items() if k not in ("head_dim", "ffn_hidden_dim", "grid_size")}
