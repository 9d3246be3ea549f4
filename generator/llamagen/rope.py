# 2D rotary position embedding of LlamaGen, from docs/llamagen.md section 2.5 (official
# autoregressive/models/gpt.py precompute_freqs_cis_2d / apply_rotary_emb, arXiv 2406.06525; after gpt-fast).
"""2D RoPE: a row/column rotary table with zero rows for the prefix, applied to interleaved pairs."""

from __future__ import annotations

import torch
from torch import Tensor


def precompute_freqs_cis_2d(
    grid_size: int, head_dim: int, base: float, cls_token_num: int, prefix: str = "zero"
) -> Tensor:
    """Rotary table [P + grid**2, head_dim // 2, 2] (cos, sin) in float32.

    The P prefix rows are zeros (official; prefix q and k vanish) or, with prefix="identity", cos 1 and sin 0.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))  # (k,)
    t = torch.arange(grid_size, device="cpu", dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (grid, k)
    grid = torch.cat(
        [
            angles[:, None, :].expand(-1, grid_size, -1),  # first k pairs turn with the row
            angles[None, :, :].expand(grid_size, -1, -1),  # last k pairs turn with the column
        ],
        dim=-1,
    )  # (grid, grid, half)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # (grid**2, half, 2)
    rows = torch.zeros(cls_token_num, half, 2, device="cpu")
    if prefix == "identity":
        rows[..., 0] = 1.0
    return torch.cat([rows, table], dim=0)


def rotary_tables(freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) tables [L, d] for `rotate`: cos repeated per pair, sin as (-sin, +sin) per pair."""
    cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]  # (L, d/2)
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, L, H, d] by tables [L, d] from `rotary_tables`; float32 math.

    Per pair (x0, x1): (x0 cos - x1 sin, x1 cos + x0 sin), the same products and sums as the official
    code, so float32 results are bit-identical; written as x * cos + swap_pairs(x) * sin (3 kernels).
    """
    B, L, H, d = x.shape
    xf = x.float()
    swapped = xf.unflatten(-1, (d // 2, 2)).flip(-1).flatten(-2)  # (B, L, H, d): (x1, x0) per pair
    out = xf * cos.view(1, L, 1, d)
    out += swapped * sin.view(1, L, 1, d)
    return out.type_as(x)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, L, H, d] by freqs_cis [L, d/2, 2]; computed in float32."""
    cos, sin = rotary_tables(freqs_cis)
    return rotate(x, cos, sin)
