"""Packed inference weights: same results as the plain linears, unchanged state, stale copies ignored."""

from __future__ import annotations

import pytest
import torch

from generator.llamagen import Transformer
from generator.llamagen.packing import linear, pack, packing_available
from tests.generator.conftest import tiny_gpt

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN packed linears")


def packed_gpt(seed: int = 0) -> Transformer:
    model = tiny_gpt("c2i", seed=seed)
    model.use_streaming_layout()
    model.fuse_gate_up()
    model.pack_weights(min_elements=0)  # the tiny test weights are below the size that pays
    return model


def test_packed_linear_matches_f_linear_to_float32_rounding() -> None:
    w, x = torch.randn(96, 64), torch.randn(3, 5, 64)
    with torch.inference_mode():
        out = linear(x, w, pack(w, min_elements=0))
    assert torch.allclose(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_packed_linear_rows_do_not_depend_on_the_other_rows() -> None:
    w, x = torch.randn(96, 64), torch.randn(16, 64)
    packed = pack(w, min_elements=0)
    with torch.inference_mode():
        assert torch.equal(linear(x[3:5], w, packed), linear(x, w, packed)[3:5])


def test_pack_weights_leaves_the_state_dict_unchanged() -> None:
    plain, packed = tiny_gpt("c2i"), packed_gpt()
    a, b = plain.state_dict(), packed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_model_samples_the_plain_models_tokens_and_close_logits() -> None:
    plain, packed = tiny_gpt("c2i"), packed_gpt()
    cond, tokens = torch.tensor([2, 5]), torch.randint(0, 64, (2, 15))
    assert torch.allclose(packed.forward_logits(cond, tokens), plain.forward_logits(cond, tokens), atol=1e-5)
    kwargs = dict(cfg_scale=4.0, top_k=20, seed=[3, 4])
    assert torch.equal(packed.generate(cond, 16, **kwargs), plain.generate(cond, 16, **kwargs))


def test_packed_copies_are_ignored_after_an_in_place_weight_update() -> None:
    packed, other = packed_gpt(seed=0), tiny_gpt("c2i", seed=1)
    packed.load_state_dict(other.state_dict())  # copies into the existing (fused, packed) weights
    cond, tokens = torch.tensor([1]), torch.randint(0, 64, (1, 10))
    # float32 rounding of the fused matmuls only (logits here reach about 10); stale copies would be off by O(1)
    assert torch.allclose(packed.forward_logits(cond, tokens), other.forward_logits(cond, tokens), atol=1e-5)


def test_packed_copies_are_ignored_while_gradients_are_enabled() -> None:
    model = packed_gpt()
    logits, _ = model.forward_train(torch.tensor([1]), torch.randint(0, 64, (1, 6)))
    logits.sum().backward()
    assert model.layers[0].attention.wqkv.weight.grad is not None


def test_bf16_weights_are_not_packed() -> None:
    assert pack(torch.randn(8, 8, dtype=torch.bfloat16)) is None


def test_only_weights_large_enough_to_gain_are_packed() -> None:
    assert pack(torch.randn(1024, 192)) is None  # the demo models' largest: plain F.linear is faster
    assert pack(torch.randn(768, 768)) is not None  # GPT-B's smallest
    model = tiny_gpt("c2i")
    model.fuse_gate_up()
    model.pack_weights()
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())
    assert all(layer.feed_forward.w13_packed is None for layer in model.layers)
