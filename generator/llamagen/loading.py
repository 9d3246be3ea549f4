# Checkpoint loading for LlamaGen models, after the loader contract of docs/llamagen.md section 3
# (official sample_c2i.py / sample_t2i.py / vq_demo.py loaders, arXiv 2406.06525), but strict and
# weights-only: a missing, extra or misshaped tensor is an error naming the key.
"""Read official LlamaGen checkpoints (every wrapper format) into models built on the meta device."""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from generator.llamagen.layout import DecodeLayout, apply_layout, choose_decode_layout
from generator.llamagen.model import ModelArgs, Task, Transformer
from generator.llamagen.vq import VQArgs, VQModel, winograd_available

# Wrapper keys tried in order; a mapping of tensors without any of them is a raw (FSDP) state dict.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Keys written by other code paths that are not weights: the legacy rotary table and attached KV caches.
IGNORED_KEY_SUFFIXES = ("freqs_cis", "causal_mask")
IGNORED_KEY_PARTS = (".kv_cache.",)
# Prefixes added by wrappers around the module (DDP, torch.compile); stripped when every key has one.
FOREIGN_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not match the architecture it is loaded into."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """torch.load with weights_only=True; argparse.Namespace (training "args") is the one allowed class."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise CheckpointError(f"cannot read checkpoint {path} as a weights-only torch file: {exc}") from exc


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Pick the weights out of any official wrapper ("model", "module", "state_dict" or raw)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: no state dict found under {', '.join(WRAPPER_KEYS)} and the top level holds "
            f"non-tensor entries: {', '.join(map(str, not_tensors[:8]))}"
        )
    state = dict(obj)
    for prefix in FOREIGN_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return {
        k: v
        for k, v in state.items()
        if not k.endswith(IGNORED_KEY_SUFFIXES) and not any(p in k for p in IGNORED_KEY_PARTS)
    }


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {', '.join(missing[:5])} ({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {', '.join(unexpected[:5])} ({len(unexpected)} in all)")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{source}: key {key} has shape {list(state[key].shape)}, the model expects {list(shape)}"
            )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it, float32 elsewhere (bf16 on CPU only when asked)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _materialise(model: nn.Module, state: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype) -> None:
    # copy=True: never keep weights backed by the memory-mapped file, which could change under a live model.
    converted = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()
    }
    model.load_state_dict(converted, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left uninitialised after loading: {', '.join(leftover[:5])}")


def resolve_gpt_args(
    model: str | ModelArgs, image_size: int | None = None, task: Task | None = None, downsample: int = 16
) -> ModelArgs:
    """A preset name sized by (task, image_size), or a ModelArgs used as given."""
    if isinstance(model, ModelArgs):
        if task is not None and task != model.task:
            raise ValueError(f"task {task!r} contradicts ModelArgs.task {model.task!r}")
        if image_size is not None and (image_size // downsample) ** 2 != model.block_size:
            raise ValueError(
                f"image_size {image_size} (grid {image_size // downsample}) contradicts "
                f"ModelArgs.block_size {model.block_size}"
            )
        return model
    return ModelArgs.from_name(model, task=task or "c2i", image_size=image_size or 256, downsample=downsample)


def build_gpt(
    args: ModelArgs,
    task: Task | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """A randomly initialised GPT as the official code initialises it, in train mode."""
    if task is not None and task != args.task:
        args = replace(args, task=task)  # the prefix length stays args.cls_token_num
    device = torch.device(device) if device is not None else default_device()
    with torch.device(device):
        model = Transformer(args)
    with torch.no_grad():
        model.initialize_weights()
    return model.to(dtype=dtype)


def build_vq(args: VQArgs, device: torch.device | str | None = None) -> VQModel:
    """A randomly initialised VQ tokenizer, in train mode."""
    device = torch.device(device) if device is not None else default_device()
    with torch.device(device):
        model = VQModel(args)
    with torch.no_grad():
        model.initialize_weights()
    return model


def save_checkpoint(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Write {"model": state_dict, **extra} (the official training wrapper); extras must be plain data."""
    if "model" in extra:
        raise ValueError("'model' is reserved for the state dict")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    torch.save({"model": state, **extra}, Path(path))


def load_gpt(
    path: str | Path,
    model: str | ModelArgs = "GPT-B",
    image_size: int | None = None,
    task: Task | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    downsample: int = 16,
    layout: DecodeLayout | Literal["auto"] = "auto",
) -> Transformer:
    """Load a GPT checkpoint in eval mode.

    model: a preset (GPT-B ... GPT-7B, sized by task (default c2i) and image_size (default 256) with a
    /downsample tokenizer) or a ModelArgs. The image size is not stored in checkpoints: the 384-px models
    need image_size=384 and t2i stage 2 needs 512. dtype defaults to bf16 on capable CUDA, else float32.
    layout: how float32 CPU weights are held for decode; "auto" times each layout here and keeps the
    fastest (see generator/llamagen/layout.py).
    """
    args = resolve_gpt_args(model, image_size, task, downsample)
    dev = torch.device(device) if device is not None else default_device()
    source = str(path)
    state = unwrap_state_dict(read_checkpoint(path), source)
    with torch.device("meta"):
        gpt = Transformer(args)
    check_state_dict(gpt, state, source)
    _materialise(gpt, state, dev, dtype or default_dtype(dev))
    gpt.eval()
    if layout == "auto":
        choose_decode_layout(gpt)
    else:
        apply_layout(gpt, layout)
    return gpt


def load_vq(
    path: str | Path,
    model: str | VQArgs = "VQ-16",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> VQModel:
    """Load a VQ tokenizer checkpoint (official "model" entry, strict, codebook_used included); eval mode."""
    args = model if isinstance(model, VQArgs) else VQArgs.from_name(model)
    dev = torch.device(device) if device is not None else default_device()
    source = str(path)
    state = unwrap_state_dict(read_checkpoint(path), source)
    with torch.device("meta"):
        vq = VQModel(args)
    check_state_dict(vq, state, source)
    _materialise(vq, state, dev, dtype)
    if dev.type == "cpu" and not winograd_available():
        vq.use_channels_last()  # NNPACK's Winograd convs (vq.conv3x3) take NCHW maps
    return vq.eval()
