"""Tiny LlamaGen configs and models for fast CPU tests of the generator mechanics."""

from __future__ import annotations

import pytest
import torch

from generator.llamagen import ModelArgs, Transformer, VQArgs, VQModel, build_gpt, build_vq

CAPTION_LEN = 6


def tiny_args(task: str = "c2i", **overrides: object) -> ModelArgs:
    """A 2-layer GPT with the official structure: 2 heads of 16, a 4x4 token grid, 64 codes, 10 classes."""
    values: dict[str, object] = dict(
        dim=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        num_classes=10,
        block_size=16,
        multiple_of=16,
        caption_dim=24,
        caption_len=CAPTION_LEN,
        cls_token_num=1 if task == "c2i" else CAPTION_LEN,
        task=task,
    )
    values.update(overrides)
    return ModelArgs(**values)  # type: ignore[arg-type]


def tiny_gpt(task: str = "c2i", seed: int = 0, **overrides: object) -> Transformer:
    """Random tiny GPT in eval mode; the output head is random too so logits are not all equal."""
    torch.manual_seed(seed)
    model = build_gpt(tiny_args(task, **overrides), device="cpu")
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=1.0)
    return model.eval()


def multinomial_per_row(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """The reference draw [B, 1]: torch.multinomial, one sample of each row with that row's generator."""
    return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generators, strict=True)])


TINY_VQ = VQArgs(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1)


@pytest.fixture
def c2i_model() -> Transformer:
    return tiny_gpt("c2i")


@pytest.fixture
def t2i_model() -> Transformer:
    return tiny_gpt("t2i")


@pytest.fixture
def captions() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded captions [2, 6, 24] with masks: 3 real rows, and 6 real rows."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    emb = torch.randn(2, CAPTION_LEN, 24, generator=gen) * mask[..., None]
    return emb, mask


@pytest.fixture
def tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return build_vq(TINY_VQ, device="cpu").eval()
