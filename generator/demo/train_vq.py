"""Train the demo VQ tokenizer (a small LlamaGen VQ: l2-normalised codebook, downsample 8)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from generator.demo.config import (
    SEED,
    VQ_AE_WARMUP,
    VQ_ARGS,
    VQ_CROP,
    VQ_FOREGROUND_WEIGHT,
    VQ_SCHEDULE,
    TrainSchedule,
)
from generator.demo.dataset import load_image_set
from generator.demo.training import batch_indices, train
from generator.llamagen import VQArgs, VQModel, build_vq, save_checkpoint

log = logging.getLogger(__name__)

KMEANS_IMAGES = 128  # full images whose latents (128 x 64 vectors) seed the codebook


def demo_vq_args(overrides: dict[str, object] | None = None) -> VQArgs:
    return VQArgs(**{**VQ_ARGS, **(overrides or {})})  # type: ignore[arg-type]


def images_to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pixel_weights(x: Tensor, foreground_weight: float) -> Tensor:
    """(B, 1, H, W) loss weights: 1 on the background (the image's border colour), more elsewhere.

    Flat backgrounds cover most pixels, so an unweighted loss learns them first and leaves the shapes in
    the mean shape colour for hundreds of steps; weighting the rest makes colours come through early.
    """
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4W)
    background = border.median(dim=2).values[:, :, None, None]
    foreground = ((x - background).abs().sum(dim=1, keepdim=True) > 0.2).to(x.dtype)
    return 1.0 + foreground_weight * foreground


def _pixel_loss(recon: Tensor, x: Tensor, foreground_weight: float) -> Tensor:
    w = pixel_weights(x, foreground_weight)
    return (w * ((recon - x).abs() + (recon - x) ** 2)).mean() / w.mean()


def reconstruction_loss(vq: VQModel, x: Tensor, foreground_weight: float = 0.0) -> Tensor:
    """Weighted pixel L1 + L2 plus the quantiser's codebook and commitment terms (no perceptual/GAN loss)."""
    recon, losses = vq(x)
    return _pixel_loss(recon, x, foreground_weight) + losses.codebook + losses.commitment


def normalised_latents(vq: VQModel, x: Tensor) -> Tensor:
    """Encoder output before quantisation, l2-normalised as the quantiser sees it: (B, e, h, w)."""
    return F.normalize(vq.quant_conv(vq.encoder(x)), p=2, dim=1)


def autoencoder_loss(vq: VQModel, x: Tensor, foreground_weight: float = 0.0) -> Tensor:
    """Warm-up objective: reconstruct through the unquantised (normalised) latent, so encoder and decoder
    learn colours and edges before the codebook exists."""
    recon = vq.decoder(vq.post_quant_conv(normalised_latents(vq, x)))
    return _pixel_loss(recon, x, foreground_weight)


@torch.no_grad()
def init_codebook(vq: VQModel, x: Tensor, generator: torch.Generator, iterations: int = 8) -> None:
    """Seed the codebook with k-means centres of the warmed-up encoder's latents (on the unit sphere)."""
    z = normalised_latents(vq, x).permute(0, 2, 3, 1).reshape(-1, vq.args.codebook_embed_dim)  # (M, e)
    n = vq.args.codebook_size
    centres = z[torch.randint(0, len(z), (n,), generator=generator)].clone()
    for _ in range(iterations):
        assign = (z @ centres.t()).argmax(dim=1)  # nearest centre by cosine
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=n)
        empty = counts == 0
        centres = torch.where(empty[:, None], z[torch.randint(0, len(z), (n,), generator=generator)], sums)
        centres = F.normalize(centres, p=2, dim=1)
    vq.quantize.embedding.weight.copy_(centres)


def train_vq(
    data_dir: Path,
    run_dir: Path,
    out_path: Path,
    *,
    schedule: TrainSchedule = VQ_SCHEDULE,
    args: VQArgs | None = None,
    seed: int = SEED,
    crop: int | None = VQ_CROP,
    ae_warmup: int = VQ_AE_WARMUP,
    foreground_weight: float = VQ_FOREGROUND_WEIGHT,
) -> VQModel:
    """Train on the images in data_dir (random flips, code-aligned crops); write the weights to out_path.

    The first `ae_warmup` steps train encoder and decoder without quantisation; the codebook is then
    initialised by k-means on the latents and training continues as a VQ.
    """
    data = load_image_set(data_dir)
    images = torch.from_numpy(data.images)  # uint8, converted per batch to keep memory small
    torch.manual_seed(seed)
    vq = build_vq(args or demo_vq_args(), device="cpu")
    log.info("VQ: %d parameters, %d training images", sum(p.numel() for p in vq.parameters()), len(data))

    vq_args = vq.args
    step_px = vq_args.downsample

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        idx = batch_indices(len(images), schedule.batch_size, generator)
        x = images_to_input(images[idx])
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if step == ae_warmup:
            # The codebook starts where the warmed-up encoder puts full images (k-means on them).
            init_idx = batch_indices(len(images), KMEANS_IMAGES, generator)
            init_codebook(vq, images_to_input(images[init_idx]), generator)
        if crop and crop < x.shape[-1]:
            # One code-aligned crop per batch: 4x cheaper steps; the network is fully convolutional.
            top, left = (
                torch.randint(0, (x.shape[-1] - crop) // step_px + 1, (2,), generator=generator) * step_px
            ).tolist()
            x = x[:, :, top : top + crop, left : left + crop]
        if step < ae_warmup:
            return autoencoder_loss(vq, x, foreground_weight)
        return reconstruction_loss(vq, x, foreground_weight)

    train(name="train-vq", run_dir=run_dir, model=vq, schedule=schedule, seed=seed, loss_fn=loss_fn)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        vq,
        out_path,
        args=_plain(vq.args),
        steps=schedule.last_step,
        schedule_steps=schedule.steps,
        batch_size=schedule.batch_size,
        seed=seed,
    )
    log.info("VQ weights written to %s", out_path)
    return vq


def _plain(args: object) -> dict[str, object]:
    """Dataclass -> dict of plain values (tuples as lists) for a weights-only checkpoint."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()}  # type: ignore[call-overload]
