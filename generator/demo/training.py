"""The training loop shared by the demo models: warm-up + cosine schedule, progress bar, resumable state.

Every step reseeds torch from (seed, step), and batches are drawn from that seed, so a run resumed from
its state file continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from generator.demo.config import TrainSchedule

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class TrainingError(ValueError):
    """A run that cannot start or resume as asked (the message names the file)."""


def lr_at(step: int, schedule: TrainSchedule) -> float:
    """Linear warm-up to `lr`, then cosine decay to a tenth of it at the last step."""
    if step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, schedule: TrainSchedule) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not on gains, biases or 1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": schedule.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, 0.95))


def _save_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, sched: TrainSchedule
) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "schedule": sched.trajectory(),
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    *,
    name: str,
    run_dir: Path,
    model: nn.Module,
    schedule: TrainSchedule,
    seed: int,
    loss_fn: Callable[[int, torch.Generator], Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    grad_clip: float = 1.0,
) -> nn.Module:
    """Run the schedule's steps (up to stop_at) of `loss_fn(step, generator)`, resuming from run_dir.

    loss_fn draws its batch from the generator it is given (seeded by step) and returns the loss.
    Returns the model in eval mode.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    optimizer = optimizer or make_optimizer(model, schedule)
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        stored = {k: state["schedule"].get(k) for k in schedule.trajectory()}
        if stored != schedule.trajectory():
            raise TrainingError(
                f"{state_path} was written by another schedule; delete it (or pass --force) to start afresh"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log.info("%s: resuming at step %d of %d", name, start, schedule.last_step)
    model.train()
    started = time.perf_counter()
    interactive = sys.stderr.isatty()
    bar = tqdm(
        range(start, schedule.last_step),
        desc=name,
        initial=start,
        total=schedule.last_step,
        mininterval=0.5 if interactive else 15.0,
        dynamic_ncols=True,
    )
    for step in bar:
        torch.manual_seed(seed * 100_003 + step)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # bf16 autocast: matmuls in bfloat16 (float32 master weights, optimizer and loss reductions).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=schedule.bf16):
            loss = loss_fn(step, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", refresh=False)
        done = step + 1
        if done % schedule.checkpoint_every == 0 or done == schedule.last_step:
            _save_state(state_path, model, optimizer, done, schedule)
            log.info(
                "%s: step %d/%d loss %.4f (%.0f s)",
                name,
                done,
                schedule.steps,
                loss.item(),
                time.perf_counter() - started,
            )
    bar.close()
    return model.eval()


def batch_indices(count: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """A random batch of row indices (with replacement across steps, without within a batch)."""
    return torch.randperm(count, generator=generator)[:batch_size]
