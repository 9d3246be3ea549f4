# LlamaGen (FoundationVision/LlamaGen, arXiv 2406.06525) re-implemented to load the official checkpoints.
"""Public API of the LlamaGen generator: loaders, builders, sampling options and runtime setup."""

from __future__ import annotations

import torch

from generator.llamagen.loading import (
    CheckpointError,
    build_gpt,
    build_vq,
    default_device,
    default_dtype,
    load_gpt,
    load_vq,
    save_checkpoint,
    sha256_file,
)
from generator.llamagen.model import GPT_PRESETS, ModelArgs, Transformer
from generator.llamagen.sampling import SamplingParams
from generator.llamagen.vq import VQ_PRESETS, VQArgs, VQModel, to_uint8


def configure_runtime(num_threads: int | None = None, allow_tf32: bool = True) -> torch.device:
    """Process-wide torch settings for a worker (call once, never at import); returns the device to use.

    num_threads sets the CPU intra-op threads; allow_tf32 lets CUDA fp32 matmuls use TF32 as the official
    samplers do (turn it off for bit-level fp32 comparisons).

    On cores shared with other work, use fewer threads than cores: every decode matmul is an OpenMP
    fork/join that waits for its slowest thread, so a descheduled thread stalls the step (GPT-B batch-1
    decode, 2 busy cores: about 375 ms/step with 2 threads, 90-140 with 1). MKL_DYNAMIC=FALSE made no
    measurable difference; which library runs the CPU decode matmuls is now timed at load (layout.py).
    OMP_WAIT_POLICY=PASSIVE halved the 2-thread step but is read when torch loads OpenMP, before this runs.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    device = default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    return device


__all__ = [
    "GPT_PRESETS",
    "VQ_PRESETS",
    "CheckpointError",
    "ModelArgs",
    "SamplingParams",
    "Transformer",
    "VQArgs",
    "VQModel",
    "build_gpt",
    "build_vq",
    "configure_runtime",
    "default_device",
    "default_dtype",
    "load_gpt",
    "load_vq",
    "save_checkpoint",
    "sha256_file",
    "to_uint8",
]
