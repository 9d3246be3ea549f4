# LlamaGen autoregressive transformer, written from the facts in docs/llamagen.md.
# Upstream: FoundationVision/LlamaGen autoregressive/models/gpt.py (arXiv 2406.06525), itself modelled on
# gpt-fast and nanoGPT. The state_dict keys and shapes are exactly the official ones.
"""LlamaGen GPT: ModelArgs presets, the Llama-style blocks, 2D RoPE with zero prefix rows, KV cache."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generator.llamagen import gemv, packing
from generator.llamagen.conditioning import CaptionEmbedder, LabelEmbedder, build_prefix_mask
from generator.llamagen.fields import check_field_types
from generator.llamagen.rope import precompute_freqs_cis_2d, rotary_tables, rotate

Rope = tuple[Tensor, Tensor]  # (cos, sin) rotary tables [L, head_dim] for the positions being run

Task = Literal["c2i", "t2i"]
PrefixRotary = Literal["zero", "identity"]

# Official GPT_models table (gpt.py): name -> (n_layer, n_head, dim).
GPT_PRESETS: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    """GPT configuration; defaults are the official ones (gpt.py ModelArgs)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    caption_dim: int = 2048
    caption_len: int = 120  # length of the t2i null caption (uncond_embedding rows)
    vocab_size: int = 16384
    cls_token_num: int = 1  # prefix length P: 1 for c2i, 120 for the official t2i models
    block_size: int = 256  # number of image tokens, a perfect square (grid side ** 2)
    task: Task = "c2i"
    # Rotary rows of the prefix. "zero" is the official table: prefix q and k become 0, so every image token
    # weighs the class or caption tokens equally (a content-blind mean). "identity" (cos 1, sin 0) leaves
    # them unrotated, so attention can pick caption words by content; official checkpoints need "zero".
    prefix_rotary: PrefixRotary = "zero"

    # Derived in __post_init__.
    head_dim: int = field(init=False)
    ffn_hidden_dim: int = field(init=False)
    grid_size: int = field(init=False)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.task not in ("c2i", "t2i"):
            raise ValueError(f"task must be 'c2i' or 't2i', got {self.task!r}")
        if self.prefix_rotary not in ("zero", "identity"):
            raise ValueError(f"prefix_rotary must be 'zero' or 'identity', got {self.prefix_rotary!r}")
        if self.dim % self.n_head != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        self.head_dim = self.dim // self.n_head
        if self.head_dim % 4 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for the 2D rotary embedding")
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        self.ffn_hidden_dim = find_multiple(hidden, self.multiple_of)
        self.grid_size = math.isqrt(self.block_size)
        if self.grid_size**2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a perfect square")
        if self.task == "t2i" and self.cls_token_num > self.caption_len:
            raise ValueError(f"cls_token_num {self.cls_token_num} exceeds caption_len {self.caption_len} for t2i")

    @classmethod
    def from_name(cls, name: str, *, task: Task = "c2i", image_size: int = 256, downsample: int = 16) -> ModelArgs:
        """Official preset sized for `image_size` px images and a /`downsample` tokenizer."""
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; known: {', '.join(GPT_PRESETS)}")
        if image_size % downsample != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of downsample {downsample}")
        n_layer, n_head, dim = GPT_PRESETS[name]
        return cls(
            dim=dim,
            n_layer=n_layer,
            n_head=n_head,
            block_size=(image_size // downsample) ** 2,
            cls_token_num=1 if task == "c2i" else 120,
            task=task,
        )

    @property
    def kv_heads(self) -> int:
        """Key/value head count (n_kv_head None means plain multi-head attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one kernel, the same float32 math
        # Normalise in float32, cast back, then apply the gain in the input dtype (order matters in bf16).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """layer(x) for the bias-free linears, through gemv.c or its packed weight where the layout says so."""
    return packing.linear(x, layer.weight, getattr(layer, "packed_weight", None),
                          getattr(layer, "native_max_rows", 0))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.dropout_p = args.ffn_dropout_p
        # [2 * hidden, dim] with w1.weight and w3.weight as its two halves (views), set by fuse_gate_up().
        self.w13: Tensor | None = None
        self.w13_packed: packing.PackedWeight | None = None  # set by Transformer.pack_weights()
        self.native_max_rows = 0  # set by Transformer.use_native_gemv()

    def fuse_gate_up(self) -> None:
        """Store w1 and w3 as the halves of one matrix, so inference runs one matmul for both.

        w1.weight and w3.weight become views of it: the state_dict keys, shapes and values are unchanged,
        and in-place updates (load_state_dict, optimiser steps) reach the fused matrix. The memory layout
        (default or streaming) of w1 is kept.
        """
        w1, w3 = self.w1.weight.data, self.w3.weight.data
        fused = torch.cat([w1, w3])  # (2 * hidden, dim)
        if not w1.is_contiguous() and w1.t().is_contiguous():
            fused = fused.t().contiguous().t()  # keep the streaming layout (see use_streaming_layout)
        hidden = w1.shape[0]
        self.w1.weight.data, self.w3.weight.data = fused[:hidden], fused[hidden:]
        self.w13 = fused

    def _fused(self) -> Tensor | None:
        """The fused matrix while w1/w3 still live in it (a .to() or assign-load replaces them) and no
        gradient is needed (the fused tensor is not a parameter)."""
        w13 = self.w13
        if w13 is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None  # a compiled graph runs the parameters themselves (inductor lays them out)
        hidden = self.w1.weight.shape[0]
        if self.w1.weight.data_ptr() != w13.data_ptr() or self.w3.weight.data_ptr() != w13[hidden:].data_ptr():
            return None
        return w13

    def forward(self, x: Tensor, train: bool = False) -> Tensor:
        w13 = None if train else self._fused()
        if w13 is None:
            h = self.w2(F.silu(self.w1(x)) * self.w3(x))
        else:
            gate, up = packing.linear(x, w13, self.w13_packed, self.native_max_rows).chunk(2, dim=-1)  # (B, L, hidden)
            h = _linear(F.silu(gate) * up, self.w2)
        return F.dropout(h, self.dropout_p, training=True) if train and self.dropout_p > 0 else h


class KVCache(nn.Module):
    """Preallocated post-RoPE keys and values [max_batch, n_kv_head, max_seq, head_dim]."""

    def __init__(
        self,
        max_batch: int,
        max_seq: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (max_batch, n_kv_head, max_seq, head_dim)
        # Not persistent: the official state_dict must never gain cache keys.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.k_cache: Tensor
        self.v_cache: Tensor

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, L, d] at sequence positions input_pos [L]; return the full caches."""
        B = k.shape[0]
        self.k_cache[:B].index_copy_(2, input_pos, k)
        self.v_cache[:B].index_copy_(2, input_pos, v)
        return self.k_cache[:B], self.v_cache[:B]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head = args.n_head
        self.n_kv_head = args.kv_heads
        self.head_dim = args.head_dim
        self.dim = args.dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.attn_dropout_p = args.attn_dropout_p
        self.resid_dropout_p = args.resid_dropout_p
        self.kv_cache: KVCache | None = None

    def _qkv(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        H, Hkv, d = self.n_head, self.n_kv_head, self.head_dim
        qkv = _linear(x, self.wqkv)  # (B, L, (H + 2 Hkv) d)
        qk = rotate(qkv[..., : (H + Hkv) * d].unflatten(-1, (H + Hkv, d)), *rope)  # (B, L, H + Hkv, d)
        q, k = qk.split([H, Hkv], dim=2)  # (B, L, H, d), (B, L, Hkv, d)
        v = qkv[..., (H + Hkv) * d :].unflatten(-1, (Hkv, d))  # (B, L, Hkv, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, d)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, train: bool) -> Tensor:
        B, _, L, _ = q.shape
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None,
            dropout_p=self.attn_dropout_p if train else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,  # kv head j serves q heads j*r .. j*r+r-1
        )  # (B, H, L, d)
        y = _linear(y.transpose(1, 2).reshape(B, L, self.dim), self.wo)  # (B, L, D)
        return F.dropout(y, self.resid_dropout_p, training=True) if train and self.resid_dropout_p > 0 else y

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None = None, train: bool = False) -> Tensor:
        """Full-sequence causal attention (training and teacher forcing); `mask` overrides causality."""
        q, k, v = self._qkv(x, rope)
        return self._attend(q, k, v, mask, causal=True, train=train)

    def forward_cached(
        self, x: Tensor, rope: Rope, input_pos: Tensor, kv_len: int | None, mask: Tensor | None
    ) -> Tensor:
        """Attention for new positions `input_pos` against the cache.

        kv_len: attend over cache[:, :, :kv_len] (eager path, filled prefix only); None attends over the
        whole cache and relies on `mask` [B, 1, L, max_seq] to hide unwritten slots (static shapes).
        """
        assert self.kv_cache is not None, "setup_caches() must be called before cached attention"
        q, k, v = self._qkv(x, rope)
        k_all, v_all = self.kv_cache.update(input_pos, k, v)
        if kv_len is not None:
            k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        return self._attend(q, k_all, v_all, mask, causal=False, train=False)


def _drop_path(x: Tensor, rate: float, train: bool) -> Tensor:
    """Stochastic depth per sample (official DropPath; rate 0 in every released config)."""
    if not train or rate == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.drop_path = drop_path

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None = None, train: bool = False) -> Tensor:
        h = x + _drop_path(self.attention(self.attention_norm(x), rope, mask, train), self.drop_path, train)
        return h + _drop_path(self.feed_forward(self.ffn_norm(h), train), self.drop_path, train)

    def forward_cached(
        self, x: Tensor, rope: Rope, input_pos: Tensor, kv_len: int | None, mask: Tensor | None
    ) -> Tensor:
        h = x + self.attention.forward_cached(self.attention_norm(x), rope, input_pos, kv_len, mask)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass(frozen=True)
class _BuiltStep:
    """A gathered gemv.StepModel, the places its tensors and caches were found (a module's _parameters,
    _buffers or _modules table, a name, the object there) and each tensor's address (`.data = ...` swaps the
    storage under the same Parameter)."""

    model: gemv.StepModel
    places: tuple[tuple[dict, str, object], ...]
    addresses: tuple[tuple[Tensor, int], ...]

    @classmethod
    def of(cls, model: gemv.StepModel, watched: list[tuple[nn.Module, str]]) -> _BuiltStep:
        places = []
        for module, name in watched:
            table = next(t for t in (module._parameters, module._buffers, module._modules) if name in t)
            places.append((table, name, table[name]))
        tensors = [value for _, _, value in places if isinstance(value, Tensor)]
        return cls(model, tuple(places), tuple((t, t.data_ptr()) for t in tensors))

    def current(self) -> bool:
        return all(table.get(name) is value for table, name, value in self.places) and all(
            t.data_ptr() == address for t, address in self.addresses)


class Transformer(nn.Module):
    """LlamaGen GPT. `forward_train`/`forward_logits` run the full sequence; `prefill`/`decode` use caches."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.cls_embedding: LabelEmbedder | CaptionEmbedder
        if args.task == "c2i":
            self.cls_embedding = LabelEmbedder(args)
        else:
            self.cls_embedding = CaptionEmbedder(args)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        rates = torch.linspace(0, args.drop_path_rate, args.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(args, rate) for rate in rates)
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Plain attribute, not a buffer: absent from state_dict and kept in float32 under .to(bf16).
        self.freqs_cis = precompute_freqs_cis_2d(
            args.grid_size, args.head_dim, args.rope_base, args.cls_token_num, prefix=args.prefix_rotary
        )
        self.rope_tables: Rope = rotary_tables(self.freqs_cis)  # (cos, sin) [P + grid**2, head_dim]
        self.max_batch_size = 0
        self.max_seq_length = 0
        self.decode_layout = "plain"  # how the inference linears hold their weights (see layout.py)
        self.native_step_max_rows = 0  # decode steps of at most this many rows run as one gemv.c call
        self._step_built: _BuiltStep | None = None  # what those steps read (see _step_model)

    # ----- construction -------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Official init: N(0, 0.02) for linears and embeddings, zero output head, unit RMSNorm gains."""
        std = self.args.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if isinstance(self.cls_embedding, CaptionEmbedder):
            emb = self.cls_embedding.uncond_embedding
            emb.copy_(torch.randn_like(emb) / self.args.caption_dim**0.5)
        nn.init.zeros_(self.output.weight)

    def use_streaming_layout(self) -> None:
        """Keep float32 CPU linear weights transposed in memory; shapes, values and state_dict are unchanged.

        Decode multiplies a few rows by every weight, so it is bound by how fast the weights stream. On the
        AMD EPYC, MKL's small-M sgemm read a row-major [in, out] matrix about twice as fast as nn.Linear's
        [out, in] one (on a Xeon it was 2.3x slower: layout.py times both); the weight becomes the
        [out, in]-shaped transpose view of that matrix. bf16 (oneDNN) and CUDA
        kernels prefer the default layout, so they are left alone.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
                    module.weight.data = w.data.t().contiguous().t()

    def use_default_layout(self) -> None:
        """Undo use_streaming_layout: every linear weight row-major [out, in] again, values unchanged."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and not module.weight.is_contiguous():
                module.weight.data = module.weight.data.contiguous()

    def fuse_gate_up(self) -> None:
        """Run each feed-forward's w1 and w3 as one matmul at inference; state_dict is unchanged."""
        for layer in self.layers:
            layer.feed_forward.fuse_gate_up()

    def pack_weights(
        self,
        rows_hint: int = packing.DECODE_ROWS_HINT,
        min_elements: int = packing.PACK_MIN_ELEMENTS,
        min_rows: int = 1,
    ) -> None:
        """Give the block linears and the output head a oneDNN-packed copy for inference matmuls.

        Decode streams every weight once per step for a few rows; on some CPUs oneDNN's packed layout streams
        faster than MKL on either plain layout (layout.py times it). The packed copies double the CPU memory
        of those weights.
        Weights under `min_elements` stay plain: for them a packed call's fixed cost outweighs the gain.
        Parameters and state_dict are unchanged; a copy is ignored (plain F.linear) once its weight is
        replaced or changed in place, or while gradients are enabled, and by matmuls of fewer than `min_rows`
        rows. Call after fuse_gate_up().
        """
        linears: list[nn.Linear] = [self.output]
        for layer in self.layers:
            ff = layer.feed_forward
            linears += [layer.attention.wqkv, layer.attention.wo, ff.w2]
            if ff.w13 is None:
                linears += [ff.w1, ff.w3]
            else:
                ff.w13_packed = packing.pack(
                    ff.w13, rows_hint, (ff.w1.weight, ff.w3.weight), min_elements, min_rows
                )
        for linear in linears:
            linear.packed_weight = packing.pack(linear.weight, rows_hint, min_elements=min_elements, min_rows=min_rows)

    def use_native_gemv(self, max_rows: int, steps: bool = False) -> None:
        """Run inference matmuls of at most `max_rows` rows through gemv.c (0: never). It reads the row-major
        weights themselves (no copy); a transposed (streaming) weight falls back to the other paths.

        steps: also run each single-position cached step (decode, and a one-token prefix) of at most
        `max_rows` rows as one gemv.c call, every layer and the output head in it (see `_native_step`).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | FeedForward):
                module.native_max_rows = max_rows
        self.native_step_max_rows = max_rows if steps else 0
        self._step_built = None

    @property
    def prefix_len(self) -> int:
        return self.args.cls_token_num

    def _rope(self, device: torch.device) -> Rope:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
            self.rope_tables = rotary_tables(self.freqs_cis)
        return self.rope_tables

    def embed_condition(self, cond: Tensor, train: bool = False) -> Tensor:
        """Class ids [B] or caption features [B, caption_len, caption_dim] -> prefix [B, P, D]."""
        if self.args.task == "c2i":
            if cond.ndim != 1 or cond.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"c2i condition must be integer class ids [B], got {tuple(cond.shape)}")
        elif cond.ndim != 3 or cond.shape[1:] != (self.args.caption_len, self.args.caption_dim):
            raise ValueError(
                f"t2i condition must be caption features [B, {self.args.caption_len}, "
                f"{self.args.caption_dim}], got {tuple(cond.shape)}"
            )
        else:
            cond = cond.to(self.tok_embeddings.weight.dtype)
        return self.cls_embedding(cond, train)[:, : self.prefix_len]

    def null_condition(self, cond: Tensor) -> Tensor:
        """The CFG null condition shaped like `cond`: class 1000 or the learned null caption."""
        return self.cls_embedding.null_condition(cond)

    # ----- full-sequence forward ----------------------------------------------------------------------
    def _forward_full(self, cond: Tensor, tokens: Tensor, emb_mask: Tensor | None, train: bool) -> Tensor:
        B, T = tokens.shape
        if T > self.args.block_size:
            raise ValueError(f"{T} tokens exceed block_size {self.args.block_size}")
        P = self.prefix_len
        x = torch.cat([self.embed_condition(cond, train), self.tok_embeddings(tokens)], dim=1)  # (B, P+T, D)
        if train and self.args.token_dropout_p > 0:
            x = F.dropout(x, self.args.token_dropout_p, training=True)
        L = P + T
        cos, sin = self._rope(x.device)
        mask = None
        if emb_mask is not None:
            if emb_mask.shape != (B, P):
                raise ValueError(f"emb_mask must be [{B}, {P}], got {tuple(emb_mask.shape)}")
            mask = build_prefix_mask(emb_mask, L, L)
        for layer in self.layers:
            x = layer(x, (cos[:L], sin[:L]), mask, train)
        logits = _linear(self.norm(x), self.output).float()  # (B, L, V)
        return logits[:, P - 1 :]  # row i predicts image token i

    def forward_train(
        self, cond: Tensor, tokens: Tensor, targets: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Training forward honouring self.training (all dropouts): (logits [B, T+1, V], loss or None).

        mask: t2i caption mask [B, P] (1 = real token) from which the official attention mask is built.
        targets: [B, T+1] image tokens; the loss is the mean cross-entropy over every logits row.
        """
        logits = self._forward_full(cond, tokens, mask, train=self.training)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def forward(
        self, cond: Tensor, tokens: Tensor, targets: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        return self.forward_train(cond, tokens, targets, mask)

    @torch.inference_mode()
    def forward_logits(self, cond: Tensor, tokens: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits float32 [B, T+1, V] with dropout off; row i predicts image token i."""
        return self._forward_full(cond, tokens, emb_mask, train=False)

    # ----- cached inference ---------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        """Attach a KV cache to every layer; reused when already large enough."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        current = self.layers[0].attention.kv_cache
        if (
            current is not None
            and self.max_batch_size >= max_batch_size
            and self.max_seq_length >= max_seq_length
            and current.k_cache.dtype == dtype
        ):
            return
        self._step_built = None  # let the old caches go
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch_size, max_seq_length, self.args.kv_heads, self.args.head_dim, dtype, device
            )
        self.max_batch_size = max_batch_size
        self.max_seq_length = max_seq_length

    def clear_caches(self) -> None:
        self._step_built = None
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = 0
        self.max_seq_length = 0

    def _step_model(self) -> gemv.StepModel | None:
        """The tensors a whole gemv.c step reads, gathered once and again whenever one of them was replaced
        (a new cache, a reloaded or moved weight, fused gate/up halves split); None without caches, with
        unfused gate/up projections (under gradients, say) or with caches that are not float32."""
        built = self._step_built
        if built is not None and built.current():
            return built.model
        self._step_built = None
        watched: list[tuple[nn.Module, str]] = [(self.norm, "weight"), (self.output, "weight")]
        layers = []
        for layer in self.layers:
            attention, ff = layer.attention, layer.feed_forward
            w13, cache = ff._fused(), attention.kv_cache
            if w13 is None or cache is None or cache.k_cache.dtype != torch.float32:
                return None
            layers.append((layer.attention_norm.weight, attention.wqkv.weight, attention.wo.weight,
                           layer.ffn_norm.weight, w13, ff.w2.weight, cache.k_cache, cache.v_cache))
            watched += [(layer.attention_norm, "weight"), (attention.wqkv, "weight"), (attention.wo, "weight"),
                        (layer.ffn_norm, "weight"), (ff.w1, "weight"), (ff.w3, "weight"), (ff.w2, "weight"),
                        (attention, "kv_cache"), (cache, "k_cache"), (cache, "v_cache")]
        model = gemv.StepModel(layers, self.norm.weight, self.output.weight, self.args.n_head, self.args.kv_heads,
                               self.args.norm_eps)
        self._step_built = _BuiltStep.of(model, watched)
        return model

    def _native_step(self, x: Tensor, input_pos: Tensor, kv_len: int | None, mask: Tensor | None) -> Tensor | None:
        """Logits of a one-position cached step run as a single gemv.c call, or None where that does not apply.

        It applies to steps of at most native_step_max_rows rows at position kv_len - 1, attending over the
        filled prefix (kv_len given) with a bool mask or none, on a CPU float32 model and caches with the
        gate and up projections fused; not under gradients, autocast or tracing (gemv.usable).
        """
        B, L, _ = x.shape
        if L != 1 or B > self.native_step_max_rows or kv_len is None or not gemv.usable(x, self.output.weight):
            return None
        if (mask is not None and mask.dtype != torch.bool) or int(input_pos[0]) != kv_len - 1:
            return None
        step = self._step_model()
        if step is None:
            return None
        cos, sin = self._rope(x.device)
        key_ok = None if mask is None else mask.expand(B, 1, 1, kv_len).reshape(B, kv_len)
        return gemv.decode_step(step, x[:, 0], kv_len - 1, cos[kv_len - 1], sin[kv_len - 1], key_ok)

    def _run_cached(self, x: Tensor, input_pos: Tensor, kv_len: int | None, mask: Tensor | None) -> Tensor:
        logits = self._native_step(x, input_pos, kv_len, mask)
        if logits is not None:
            return logits
        cos, sin = self._rope(x.device)
        rope = (cos[input_pos], sin[input_pos])  # (L, head_dim) each
        for layer in self.layers:
            x = layer.forward_cached(x, rope, input_pos, kv_len, mask)
        return _linear(self.norm(x[:, -1]), self.output).float()  # (B, V): only the last position is sampled

    def prefill(self, cond: Tensor, input_pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """Run the prefix at positions input_pos (= 0..P-1) into the caches; logits [B, V] of the last one.

        mask: [B, 1, P, P] bool attention mask (t2i), or None for causal attention.
        """
        x = self.embed_condition(cond)  # (B, P, D)
        if mask is None:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        return self._run_cached(x, input_pos, input_pos.shape[0], mask)

    def decode(
        self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Feed tokens [B, 1] at position input_pos [1]; logits [B, V] float32.

        kv_len = input_pos + 1 attends over the filled prefix only. With kv_len None, `mask`
        [B, 1, 1, max_seq] must hide the unwritten slots (static shapes for torch.compile / CUDA graphs).
        """
        return self._run_cached(self.tok_embeddings(tokens), input_pos, kv_len, mask)

    def decode_static(self, tokens: Tensor, input_pos: Tensor, key_ok: Tensor) -> Tensor:
        """decode() with fixed shapes for torch.compile: attends over the whole cache.

        key_ok [B, 1, 1, max_seq] bool marks usable keys (t2i caption padding is False); slots after
        input_pos are hidden here.
        """
        positions = torch.arange(self.max_seq_length, device=tokens.device)
        mask = key_ok & (positions <= input_pos)[None, None, None, :]  # (B, 1, 1, max_seq)
        return self.decode(tokens, input_pos, kv_len=None, mask=mask)

    def generate(
        self,
        cond: Tensor,
        max_new_tokens: int,
        cfg_scale: float = 4.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
        cfg_interval: int = -1,
        emb_mask: Tensor | None = None,
        compile: bool = False,
    ) -> Tensor:
        """Sample image tokens int64 [B, max_new_tokens]; see sampling.generate (where CFG lives).

        seed: one int (one generator for the batch, official semantics) or one seed per row (each row
        then gets the tokens it would get alone).
        """
        # Imported here: sampling builds on this module, and the model stays free of sampling logic.
        from generator.llamagen import sampling

        params = sampling.SamplingParams(
            cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p
        )
        generators = sampling.make_generators(seed, cond.shape[0], self.tok_embeddings.weight.device)
        return sampling.generate(self, cond, max_new_tokens, params, generators, emb_mask, compile)
