"""How CPU decode holds its float32 weights, chosen by timing decode steps on this machine.

Decode multiplies a few rows by every weight, so it is bound by how fast the weights stream through the
matmuls, and which layout streams fastest depends on the CPU and its BLAS paths, not on the model. GPT-B,
one decode step at 2 threads (ms; 2 rows is batch 1 under CFG, 16 rows batch 8):

| CPU | rows | plain [out, in] | streaming [in, out] | oneDNN packed |
|---|---|---|---|---|
| AMD EPYC (AVX-512) | 2 | slower | faster | fastest |
| Intel Xeon (Sapphire Rapids) | 2 | 30.6 | 71.0 | 32.4 |
| Intel Xeon (Sapphire Rapids) | 16 | 60.4 | 79.1 | 45.2 |

So no fixed choice is right everywhere, nor for every batch size. Two more candidates are our own kernels
(gemv.c, where a C compiler could build it). "gemv.c" runs the matmuls: it reads each row-major weight row
once for every row of x. On the AMD EPYC, GPT-B's linears at 2 rows took 11-18 ms with it against 18-30
ms oneDNN-packed, timed in the same runs; at 16 rows oneDNN was faster. "gemv.c steps" also runs each
decode step whole, every layer in one call, which saves the 20-odd small tensor operations per layer around
the matmuls: 18.4-21.2 ms a step at 2 rows against 25.9-27.9 for the matmuls alone (same runs, 2026-12-03).
`choose_decode_layout` times a few decode steps of each at 2 and at 16 rows, alternating them, and keeps:
the faster plain layout, the faster gemv.c kernel for calls of up to 2 or 16 rows where it wins at 2, plus
oneDNN-packed copies used from the row count at which they win (every call, calls of more than 2 rows, or
none). On a 2-core Intel Xeon (AVX-512) after gemv.c's prefetch fix, one GPT-B step (ms, same runs): at 2
rows gemv.c steps 16.0-16.2, plain 21.2-23.5, packed 25.1-27.6; at 16 rows gemv.c steps 37.3-37.4, packed
36.2-39.6, plain 45.8-48.2 (2026-12-03).

Every choice computes the same products; they differ only in float32 summation order (about 1e-6
relative; gemv.c steps also round the attention's exponentials and the norms their own way, to the same
tolerance). A process keeps its choice for the model's lifetime; processes on different machines (or under
very different load) may choose differently, as cuDNN's benchmark mode does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from generator.llamagen import gemv, packing
from generator.llamagen.model import Transformer, find_multiple

log = logging.getLogger(__name__)

Base = Literal["plain", "streaming"]
BASES: tuple[Base, ...] = ("plain", "streaming")
# Our own kernels (gemv.c): the matmuls alone, or whole decode steps with them; by whether steps run whole.
NATIVE = {"gemv.c": False, "gemv.c steps": True}
FEW_ROWS = packing.DECODE_ROWS_HINT  # batch 1 under CFG
MANY_ROWS = 16  # batch 8 under CFG
# A model whose decode step takes longer than this is timed once per candidate and row count: choosing then
# costs about 3 x 2 of its steps, plus switching layouts, rather than 3 x 2 x 2 x 4. GPT-B (steps of 25-60
# ms) takes 6.1-6.3 s to choose on the 2-core Xeon, mostly copying and packing its 390 MB of weights.
SLOW_STEP_S = 0.2


def _rows(n: int) -> str:
    return f"{n} row{'s' if n > 1 else ''}"


@dataclass(frozen=True)
class DecodeLayout:
    """A plain layout for the weights, the row count up to which matmuls run gemv.c (None: never; needs the
    plain base), and the row count from which the others use packed copies (None: never). native_steps: the
    decode steps of up to native_up_to_rows rows also run whole in gemv.c (Transformer._native_step)."""

    base: Base = "plain"
    packed_from_rows: int | None = None
    native_up_to_rows: int | None = None
    native_steps: bool = False

    @classmethod
    def parse(cls, text: str) -> DecodeLayout:
        """The layout `str(layout)` names (as recorded with each released image)."""
        base, *parts = [part.strip() for part in text.split(",")]
        fields: dict[str, int | bool] = {}
        for part in parts:
            words = part.split()
            if len(words) == 4 and words[:2] == ["packed", "from"] and words[2].isdigit():
                fields["packed_from_rows"] = int(words[2])
            elif len(words) == 5 and words[:3] == ["gemv.c", "up", "to"] and words[3].isdigit():
                fields["native_up_to_rows"] = int(words[3])
            elif len(words) == 6 and words[:4] == ["gemv.c", "steps", "up", "to"] and words[4].isdigit():
                fields["native_up_to_rows"], fields["native_steps"] = int(words[4]), True
            else:
                raise ValueError(f"unknown decode layout {text!r}")
        if base not in BASES:
            raise ValueError(f"unknown decode layout {text!r}")
        return cls(base, **fields)  # type: ignore[arg-type]

    def __str__(self) -> str:
        parts = [self.base]
        if self.native_up_to_rows is not None:
            steps = " steps" if self.native_steps else ""
            parts.append(f"gemv.c{steps} up to {_rows(self.native_up_to_rows)}")
        if self.packed_from_rows is not None:
            parts.append(f"packed from {_rows(self.packed_from_rows)}")
        return ", ".join(parts)


def apply_layout(model: Transformer, layout: DecodeLayout, min_elements: int = packing.PACK_MIN_ELEMENTS) -> None:
    """Hold the model's inference linears in `layout`; values, shapes and state_dict are unchanged.

    plain: nn.Linear's own [out, in] row-major weights. streaming: the transposed [in, out] matrix under an
    [out, in] view (Transformer.use_streaming_layout). Packed copies (Transformer.pack_weights) of the
    weights with at least `min_elements` serve matmuls of `packed_from_rows` rows or more. Gate and up
    projections are fused in every layout. Only float32 CPU weights change layout.
    """
    if layout.base not in BASES:
        raise ValueError(f"unknown layout {layout.base!r}; expected one of {', '.join(BASES)}")
    if layout.native_up_to_rows is not None and layout.base != "plain":
        raise ValueError("gemv.c reads row-major weights: it needs the plain base layout")
    if layout.native_steps and layout.native_up_to_rows is None:
        raise ValueError("gemv.c steps need the row count they run up to")
    model.use_native_gemv(0)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.packed_weight = None
    for layer in model.layers:
        layer.feed_forward.w13_packed = None
    if layout.base == "streaming":
        model.use_streaming_layout()
    else:
        model.use_default_layout()
    model.fuse_gate_up()
    if layout.packed_from_rows is not None:
        model.pack_weights(min_elements=min_elements, min_rows=layout.packed_from_rows)
    if layout.native_up_to_rows is not None:
        model.use_native_gemv(layout.native_up_to_rows, steps=layout.native_steps)
    model.decode_layout = str(layout)


@torch.inference_mode()
def time_decode_step(model: Transformer, rows: int = FEW_ROWS, steps: int = 3) -> float:
    """Fastest of `steps` single-token decode steps (seconds) for `rows` rows, after one warm-up step.

    Runs on scratch caches that are cleared afterwards; the keys attended over are zeros (the time is the
    weights', not the prefix's).
    """
    model.setup_caches(rows, find_multiple(steps + 1, 8))
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=model.tok_embeddings.weight.device)
    best = float("inf")
    try:
        for i in range(steps + 1):
            started = time.perf_counter()
            model.decode(tokens, torch.tensor([i], device=tokens.device), kv_len=i + 1)
            if i:
                best = min(best, time.perf_counter() - started)
    finally:
        model.clear_caches()
    return best


def choose_decode_layout(
    model: Transformer, rounds: int = 2, steps: int = 3
) -> tuple[DecodeLayout, dict[str, dict[int, float]]]:
    """Apply the fastest layout here; returns it and each candidate's best step (ms) by row count.

    Packed copies are a candidate only where some weight is big enough to pack (PACK_MIN_ELEMENTS).
    Candidates are timed in turn, `rounds` times, so a burst of load elsewhere does not fall on one only;
    models whose step is slower than SLOW_STEP_S get one round of one step. Models that are not float32 on
    CPU get the plain layout without timing.
    """
    weight = model.tok_embeddings.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        apply_layout(model, DecodeLayout())
        return DecodeLayout(), {}
    candidates = {base: DecodeLayout(base) for base in BASES}
    big_enough = any(
        m.weight.numel() >= packing.PACK_MIN_ELEMENTS for m in model.modules() if isinstance(m, nn.Linear)
    )
    if packing.packing_available() and big_enough:  # small models would only time plain weights twice
        candidates["packed"] = DecodeLayout("plain", packed_from_rows=1)
    if gemv.available():
        for name, steps in NATIVE.items():
            candidates[name] = DecodeLayout("plain", native_up_to_rows=MANY_ROWS, native_steps=steps)
    if time_decode_step(model, FEW_ROWS, steps=1) > SLOW_STEP_S:
        rounds, steps = 1, 1
    best = {name: dict.fromkeys((FEW_ROWS, MANY_ROWS), float("inf")) for name in candidates}
    for _ in range(rounds):
        for name, candidate in candidates.items():
            apply_layout(model, candidate)
            for rows in (FEW_ROWS, MANY_ROWS):
                best[name][rows] = min(best[name][rows], time_decode_step(model, rows, steps))
    chosen = _combine(best)
    apply_layout(model, chosen)
    timings = {name: {rows: round(s * 1e3, 3) for rows, s in by_rows.items()} for name, by_rows in best.items()}
    log.info("CPU decode layout: %s (best step in ms by rows: %s)", chosen, timings)
    return chosen, timings


def _combine(best: dict[str, dict[int, float]]) -> DecodeLayout:
    """The layout that runs each row count with the candidate that was fastest at it (at 2 rows and at 16)."""
    fastest_few = min(best, key=lambda n: best[n][FEW_ROWS])
    if fastest_few in NATIVE:  # one gemv.c kind per layout: up to 16 rows where it beats the BLAS paths there
        steps = NATIVE[fastest_few]
        if best[fastest_few][MANY_ROWS] <= min(t[MANY_ROWS] for n, t in best.items() if n not in NATIVE):
            return DecodeLayout("plain", native_up_to_rows=MANY_ROWS, native_steps=steps)
        # gemv.c needs the plain base; past 2 rows, packed copies where they win
        packed_wins = "packed" in best and best["packed"][MANY_ROWS] < best["plain"][MANY_ROWS]
        return DecodeLayout("plain", FEW_ROWS + 1 if packed_wins else None, FEW_ROWS, steps)
    base = min(BASES, key=lambda b: best[b][FEW_ROWS])
    packed_from = None
    if "packed" in best:
        if best["packed"][FEW_ROWS] < best[base][FEW_ROWS]:
            packed_from = 1
        elif best["packed"][MANY_ROWS] < min(best[b][MANY_ROWS] for b in BASES):
            packed_from = FEW_ROWS + 1
    return DecodeLayout(base, packed_from)
