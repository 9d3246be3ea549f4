# Prefix (condition) embedders of LlamaGen, from docs/llamagen.md sections 2.1 and 5 (official
# autoregressive/models/gpt.py LabelEmbedder / CaptionEmbedder and the t2i masks of generate.py, arXiv 2406.06525).
"""Class-label and caption embedders (with their CFG null conditions) and the t2i attention mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from generator.llamagen.model import ModelArgs


class LabelEmbedder(nn.Module):
    """Class ids -> [B, 1, D]; row num_classes is the learned null class used by CFG."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        extra = 1 if args.class_dropout_prob > 0 else 0
        self.embedding_table = nn.Embedding(args.num_classes + extra, args.dim)
        self.num_classes = args.num_classes
        self.dropout_prob = args.class_dropout_prob

    def null_condition(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, self.num_classes)

    def forward(self, labels: Tensor, train: bool = False) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, D)


class CaptionMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features [B, caption_len, caption_dim] -> [B, caption_len, D]; owns the null caption."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.cap_proj = CaptionMLP(args.caption_dim, args.dim, args.dim)
        # A persistent buffer in the official state_dict (the learned null caption).
        self.register_buffer(
            "uncond_embedding", torch.randn(args.caption_len, args.caption_dim) / args.caption_dim**0.5
        )
        self.uncond_embedding: Tensor
        self.dropout_prob = args.class_dropout_prob

    def null_condition(self, caption: Tensor) -> Tensor:
        return self.uncond_embedding.to(caption.dtype).expand(caption.shape[0], -1, -1)

    def forward(self, caption: Tensor, train: bool = False) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


def build_prefix_mask(emb_mask: Tensor, query_len: int, key_len: int, query_start: int = 0) -> Tensor:
    """Official t2i attention mask [B, 1, query_len, key_len] (bool, True = attend).

    Causal over absolute positions, caption keys where emb_mask is 0 hidden from every query, and the
    diagonal forced on so padding rows still attend to themselves.
    """
    B, P = emb_mask.shape
    device = emb_mask.device
    q_pos = torch.arange(query_start, query_start + query_len, device=device)[:, None]  # (Lq, 1)
    k_pos = torch.arange(key_len, device=device)[None, :]  # (1, Lk)
    causal = k_pos <= q_pos
    key_ok = torch.ones(B, key_len, dtype=torch.bool, device=device)
    n = min(P, key_len)
    key_ok[:, :n] = emb_mask[:, :n].bool()
    mask = causal[None] & key_ok[:, None, :]  # (B, Lq, Lk)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]  # (B, 1, Lq, Lk)
