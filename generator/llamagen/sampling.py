# Sampling for LlamaGen, written from docs/llamagen.md section 4 (official autoregressive/models/generate.py,
# arXiv 2406.06525, itself after gpt-fast). Differences from upstream that keep the same results:
# attention runs over the filled prefix of the KV cache only (no per-step cache copy), only the last
# position goes through the output head, and every request row can carry its own torch.Generator. On CPU
# the probabilities of a step come from one gemv.c pass (equal to float32 rounding; the draws are torch's).
"""Seeded, batched LlamaGen sampling with classifier-free guidance, top-k and top-p."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from generator.llamagen import gemv
from generator.llamagen.conditioning import build_prefix_mask
from generator.llamagen.model import find_multiple

if TYPE_CHECKING:
    from generator.llamagen.model import Transformer

MIN_TEMPERATURE = 1e-5  # the official floor


@dataclass(frozen=True)
class SamplingParams:
    """Options of one sampling run (defaults: the official sample_c2i.py, except top_k 0 = off)."""

    cfg_scale: float = 4.0  # > 1 enables classifier-free guidance
    cfg_interval: int = -1  # -1: guide every step; else stop after decode iteration cfg_interval
    temperature: float = 1.0
    top_k: int = 0  # 0: off; ties at the k-th value are kept
    top_p: float = 1.0  # 1.0: off; the first token past the threshold is kept

    def __post_init__(self) -> None:
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_interval < -1:
            raise ValueError(f"cfg_interval must be >= -1, got {self.cfg_interval}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


def top_k_filter_(logits: Tensor, top_k: int) -> Tensor:
    """In place: set every logit strictly below the k-th largest of its row to -inf (ties survive)."""
    V = logits.shape[-1]
    k = min(max(top_k, 1), V)
    kth = torch.kthvalue(logits, V - k + 1, dim=-1, keepdim=True).values  # k-th largest; cheaper than topk
    return logits.masked_fill_(logits < kth, float("-inf"))


def top_p_filter_(logits: Tensor, top_p: float) -> Tensor:
    """In place: keep the smallest prefix of sorted tokens whose probability reaches top_p (nucleus)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: the token crossing top_p is kept
    remove[..., 0] = False
    return logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Logits [B, V] -> probabilities: temperature (floored at 1e-5), then top-k, then top-p."""
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k > 0:
        top_k_filter_(logits, params.top_k)
    if params.top_p < 1.0:
        top_p_filter_(logits, params.top_p)
    return F.softmax(logits, dim=-1)


def sample(probs: Tensor, generators: Sequence[torch.Generator], *, checked: bool = False) -> Tensor:
    """Draw one token per row [B, 1]: one generator shared by the batch, or one generator per row.

    The draw is torch.multinomial's for one sample, with the same generator calls and so the same tokens:
    exponential noise q of the probabilities' shape and dtype, then the first arg-max of p / q. Its checks
    (finite, non-negative, some mass in each row) run once for the whole batch here, not once per row, where
    they took 40% of each draw: 8 rows of the demo model drew in 0.52 ms a step, a quarter of its token loop,
    and draw in 0.34 now. Rows that fail them go to torch.multinomial, before any draw, which names the fault.
    checked: the caller vouches that every row passes them (gemv.probs checks its own output): they are skipped.
    """
    if len(generators) not in (1, probs.shape[0]):
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    if not checked and not bool(torch.isfinite(probs).all() & (probs >= 0).all() & (probs.sum(dim=-1) > 0).all()):
        if len(generators) == 1:
            return torch.multinomial(probs, 1, generator=generators[0])
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generators, strict=True)])
    noise = torch.empty_like(probs)
    if len(generators) == 1:
        noise.exponential_(generator=generators[0])
    else:
        for row, generator in zip(noise, generators, strict=True):
            row.exponential_(generator=generator)
    return torch.div(probs, noise, out=noise).argmax(dim=-1, keepdim=True)


def combine_cfg(logits: Tensor, params: SamplingParams, guide: bool) -> Tensor:
    """Rows [cond; null] -> guided cond logits uncond + (cond - uncond) * s, or the cond half alone."""
    if not params.guided:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    if not guide:
        return cond
    return torch.sub(cond, uncond).mul_(params.cfg_scale).add_(uncond)  # one buffer, same float result


def probs_of(logits: Tensor, params: SamplingParams, guide: bool) -> Tensor:
    """Probabilities of a step's logits rows ([cond; null] under CFG): combine_cfg, then logits_to_probs.

    On CPU float32 without top-p these run as one gemv.c pass where the kernel is built (a batch-1 GPT-B step
    spent about 0.75 ms in the six tensor operations); the results equal them to float32 rounding.
    """
    return _probs(logits, params, guide)[0]


def _probs(logits: Tensor, params: SamplingParams, guide: bool) -> tuple[Tensor, bool]:
    """probs_of's probabilities, and whether gemv.c made them (it checks that each row is a distribution)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and params.top_p == 1.0:
        rows = logits[: logits.shape[0] // 2] if params.guided and not guide else logits
        probs = gemv.probs(rows, params.guided and guide, params.cfg_scale,
                           max(params.temperature, MIN_TEMPERATURE), params.top_k)
        if probs is not None:
            return probs, True
    return logits_to_probs(combine_cfg(logits, params, guide), params), False


def next_token(logits: Tensor, params: SamplingParams, guide: bool, generators: Sequence[torch.Generator]) -> Tensor:
    """sample(probs_of(...)), without sample's checks where gemv.c made the probabilities: it checks its own.
    The checks took 9% of the demo model's token loop at batch 1 and 7% at batch 8 (A/B in one process).

    Under top-k 1 (greedy: the demo cards' default) each row's mass is usually on one token, and then the
    draw's arg-max of p / q is that token whatever the noise q (positive and finite): it is returned without
    drawing, the same token. gemv.c's rows are distributions (some mass in each), so one non-zero per row is
    one non-zero per row in all, a single count. A row with a tie keeps two tokens, and then every row draws.
    The generators are not advanced then; each run makes its own, and nothing reads them after it. Same
    process A/B, demo t2i model, one thread: the token loop at batch 8 went from 86-88 to 72-76 ms, at
    batch 1 from 35 to 33 ms, with the same tokens.
    """
    probs, checked = _probs(logits, params, guide)
    if checked and params.top_k == 1 and int(torch.count_nonzero(probs)) == probs.shape[0]:
        return probs.argmax(dim=-1, keepdim=True)
    return sample(probs, generators, checked=checked)


def make_generators(seed: int | Sequence[int], batch: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator for an int seed (official: one draw per step over the batch), or one per row."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) not in (1, batch):
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}: give one seed or one per row")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


DecodeFn = Callable[[Tensor, Tensor, int, "Tensor | None"], Tensor]


@dataclass
class DecodePlan:
    """Per-run tensors allocated once: positions, the t2i key mask and the output buffer."""

    rows: int
    max_seq: int
    positions: Tensor  # (max_seq,) absolute positions
    key_ok: Tensor | None  # (rows, 1, 1, max_seq) bool, t2i only: padding caption keys are False
    out: Tensor  # (B, N) int64


def prefill(
    model: Transformer,
    cond: Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator],
    emb_mask: Tensor | None = None,
) -> Tensor:
    """Run the (guided) prefix through the caches and sample the first image token [B, 1]."""
    P = model.prefix_len
    positions = torch.arange(P, device=cond.device)
    mask = None if emb_mask is None else build_prefix_mask(emb_mask, P, P)
    logits = model.prefill(cond, positions, mask)
    return next_token(logits, params, True, generators)


def decode_one_token(
    decode: DecodeFn,
    token: Tensor,
    input_pos: Tensor,
    kv_len: int,
    mask: Tensor | None,
    params: SamplingParams,
    generators: Sequence[torch.Generator],
    guide: bool,
) -> Tensor:
    """Feed the last token [B, 1] (duplicated for the null half under CFG) and sample the next one."""
    x = torch.cat([token, token]) if params.guided else token
    logits = decode(x, input_pos, kv_len, mask)
    return next_token(logits, params, guide, generators)


def decode_n_tokens(
    decode: DecodeFn,
    first: Tensor,
    plan: DecodePlan,
    prefix_len: int,
    params: SamplingParams,
    generators: Sequence[torch.Generator],
) -> Tensor:
    """Fill plan.out[:, 1:] token by token; decode iteration i feeds position prefix_len + i."""
    token = first
    for i in range(plan.out.shape[1] - 1):
        pos = prefix_len + i
        guide = not (params.cfg_interval > -1 and i > params.cfg_interval)
        mask = None if plan.key_ok is None else plan.key_ok[..., : pos + 1]
        token = decode_one_token(decode, token, plan.positions[pos : pos + 1], pos + 1, mask, params, generators, guide)
        plan.out[:, i + 1 : i + 2] = token
    return plan.out


def _eager_decode(model: Transformer) -> DecodeFn:
    def run(tokens: Tensor, input_pos: Tensor, kv_len: int, mask: Tensor | None) -> Tensor:
        return model.decode(tokens, input_pos, kv_len=kv_len, mask=mask)

    return run


def _static_decode(model: Transformer, plan: DecodePlan) -> DecodeFn:
    """Fixed-shape decode over the whole cache, compiled once per model: CUDA graphs on CUDA; on CPU,
    inductor with freezing, which fuses the small element-wise ops between the matmuls.

    Weights loaded later are followed: changed in place, the graph reads them; replaced, dynamo recompiles
    (tested on a tiny model, checked by hand at GPT-B width). On CPU it pays at batch 1 only: GPT-B fp32
    under CFG (2 rows), 2 threads, Xeon: 25.6 ms/step against 27.6 eager; at batch 8 (16 rows) 156 ms
    against the eager packed matmuls' 62. Compiling takes ~30 s.
    """
    compiled = getattr(model, "_compiled_decode_static", None)
    if compiled is None:
        if plan.positions.device.type == "cuda":
            compiled = torch.compile(model.decode_static, mode="reduce-overhead", fullgraph=True)
        else:
            compiled = torch.compile(model.decode_static, fullgraph=True, options={"freezing": True})
        model._compiled_decode_static = compiled
    key_ok = plan.key_ok
    if key_ok is None:
        key_ok = torch.ones(plan.rows, 1, 1, plan.max_seq, dtype=torch.bool, device=plan.positions.device)

    def run(tokens: Tensor, input_pos: Tensor, kv_len: int, mask: Tensor | None) -> Tensor:
        return compiled(tokens, input_pos, key_ok).clone()  # CUDA-graph outputs are overwritten next step

    return run


@torch.inference_mode()
def generate(
    model: Transformer,
    cond: Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    generators: Sequence[torch.Generator],
    emb_mask: Tensor | None = None,
    compile: bool = False,
) -> Tensor:
    """Sample image tokens int64 [B, max_new_tokens] for conditions `cond`.

    cond: class ids [B] (c2i) or caption features [B, caption_len, caption_dim] (t2i, with emb_mask [B, P]
    of 1 for real caption rows; None means all rows are real). Under CFG the batch runs as [cond; null].
    generators: one shared by the batch or one per row (see make_generators). compile: the static
    decode path, compiled on first use per cache length (CUDA graphs on CUDA, inductor on CPU).
    """
    if not 1 <= max_new_tokens <= model.args.block_size:
        raise ValueError(f"max_new_tokens must be in [1, {model.args.block_size}], got {max_new_tokens}")
    device = model.tok_embeddings.weight.device
    cond = cond.to(device)
    B, P = cond.shape[0], model.prefix_len
    if model.args.task == "t2i":
        emb_mask = torch.ones(B, P, dtype=torch.bool, device=device) if emb_mask is None else emb_mask
        if emb_mask.shape != (B, P):
            raise ValueError(f"emb_mask must be [{B}, {P}], got {tuple(emb_mask.shape)}")
        emb_mask = emb_mask.to(device=device, dtype=torch.bool)
    elif emb_mask is not None:
        raise ValueError("emb_mask is only meaningful for t2i models")
    if params.guided:
        cond = torch.cat([cond, model.null_condition(cond)])
        if emb_mask is not None:
            emb_mask = torch.cat([emb_mask, emb_mask])  # the null caption uses the prompt's mask
    rows = cond.shape[0]
    model.setup_caches(rows, find_multiple(P + max_new_tokens, 8))
    max_seq = model.max_seq_length  # an existing larger cache is reused
    key_ok = None
    if emb_mask is not None:
        key_ok = torch.ones(rows, 1, 1, max_seq, dtype=torch.bool, device=device)
        key_ok[:, 0, 0, :P] = emb_mask
    plan = DecodePlan(
        rows=rows,
        max_seq=max_seq,
        positions=torch.arange(max_seq, device=device),
        key_ok=key_ok,
        out=torch.empty(B, max_new_tokens, dtype=torch.int64, device=device),
    )
    plan.out[:, :1] = prefill(model, cond, params, generators, emb_mask)
    decode = _static_decode(model, plan) if compile else _eager_decode(model)
    return decode_n_tokens(decode, plan.out[:, :1], plan, P, params, generators)
