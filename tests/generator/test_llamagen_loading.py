"""Checkpoint loading: every official wrapper, weights-only reads, strict keys and shapes, hashing."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from generator.llamagen import (
    CheckpointError,
    ModelArgs,
    Transformer,
    load_gpt,
    load_vq,
    save_checkpoint,
    sha256_file,
)
from generator.llamagen.loading import resolve_gpt_args
from tests.generator.conftest import TINY_VQ, tiny_args, tiny_gpt

Wrap = Callable[[dict[str, torch.Tensor]], Any]

WRAPPERS: dict[str, Wrap] = {
    "plain_state_dict": lambda sd: sd,
    "ddp_model": lambda sd: {"model": sd},
    "deepspeed_module": lambda sd: {"module": sd},
    "state_dict_entry": lambda sd: {"state_dict": sd},
    "fsdp_raw_with_stray_freqs_cis": lambda sd: {**sd, "freqs_cis": torch.zeros(17, 8, 2)},
    "training_format": lambda sd: {
        "model": sd,
        "ema": {k: torch.zeros_like(v) for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "steps": 1000,
        "args": argparse.Namespace(gpt_model="GPT-B", image_size=256, lr=1e-4),
    },
    "attached_kv_caches": lambda sd: {
        **sd,
        "layers.0.attention.kv_cache.k_cache": torch.zeros(2, 2, 24, 16),
        "layers.0.attention.kv_cache.v_cache": torch.zeros(2, 2, 24, 16),
    },
}


def official_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=str)
def test_load_gpt_reads_every_official_wrapper(wrapper: str, tmp_path: Path, c2i_model: Transformer) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(WRAPPERS[wrapper](official_state(c2i_model)), path)
    loaded = load_gpt(path, model=tiny_args(), device="cpu")
    expected = c2i_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_streaming_weight_layout_keeps_state_dict_and_logits(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([1]), torch.randint(0, 64, (1, 5))
    before = c2i_model.forward_logits(cond, tokens)
    state = official_state(c2i_model)
    c2i_model.use_streaming_layout()
    assert not c2i_model.output.weight.is_contiguous()
    assert all(torch.equal(v, state[k]) for k, v in c2i_model.state_dict().items())
    assert torch.allclose(c2i_model.forward_logits(cond, tokens), before, atol=1e-5)


def test_fused_gate_up_keeps_state_dict_logits_and_greedy_tokens(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([1]), torch.randint(0, 64, (1, 5))
    before = c2i_model.forward_logits(cond, tokens)
    greedy = c2i_model.generate(torch.tensor([3]), 16, cfg_scale=2.0, top_k=1, seed=0)
    state = official_state(c2i_model)
    c2i_model.use_streaming_layout()
    c2i_model.fuse_gate_up()
    ff = c2i_model.layers[0].feed_forward
    with torch.inference_mode():
        assert ff._fused() is not None
    shapes = {k: tuple(v.shape) for k, v in c2i_model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(v, state[k]) for k, v in c2i_model.state_dict().items())
    assert torch.allclose(c2i_model.forward_logits(cond, tokens), before, atol=1e-5)
    assert torch.equal(c2i_model.generate(torch.tensor([3]), 16, cfg_scale=2.0, top_k=1, seed=0), greedy)


def test_fused_gate_up_sees_in_place_loads_and_is_dropped_when_weights_are_replaced(c2i_model: Transformer) -> None:
    c2i_model.fuse_gate_up()
    ff = c2i_model.layers[0].feed_forward
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        ff.w3.weight.mul_(2.0)  # an in-place update, as load_state_dict does
        reference = ff.w2(torch.nn.functional.silu(ff.w1(x)) * ff.w3(x))
        assert ff._fused() is not None and torch.allclose(ff(x), reference, atol=1e-6)
        ff.w1.weight = torch.nn.Parameter(ff.w1.weight.detach().clone() + 1.0)  # no longer a view
        assert ff._fused() is None
        reference = ff.w2(torch.nn.functional.silu(ff.w1(x)) * ff.w3(x))
        assert torch.equal(ff(x), reference)


def test_loaded_model_is_in_eval_mode_with_exactly_the_official_keys(tmp_path: Path, c2i_model: Transformer) -> None:
    save_checkpoint(c2i_model, tmp_path / "ckpt.pt")
    loaded = load_gpt(tmp_path / "ckpt.pt", model=tiny_args(), device="cpu")
    assert not loaded.training
    assert list(loaded.state_dict()) == list(c2i_model.state_dict())


def test_save_checkpoint_writes_the_official_model_wrapper(tmp_path: Path, c2i_model: Transformer) -> None:
    save_checkpoint(c2i_model, tmp_path / "ckpt.pt", steps=7)
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(raw) == {"model", "steps"} and raw["steps"] == 7


def test_checkpoint_with_arbitrary_pickled_object_is_refused(tmp_path: Path, c2i_model: Transformer) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": official_state(c2i_model), "extra": Path("/etc/passwd")}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_gpt(path, model=tiny_args(), device="cpu")


def test_missing_key_is_an_error_naming_the_key(tmp_path: Path, c2i_model: Transformer) -> None:
    state = official_state(c2i_model)
    del state["layers.1.feed_forward.w3.weight"]
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) layers\.1\.feed_forward\.w3\.weight"):
        load_gpt(tmp_path / "ckpt.pt", model=tiny_args(), device="cpu")


def test_misshaped_key_is_an_error_naming_the_key_and_both_shapes(tmp_path: Path, c2i_model: Transformer) -> None:
    state = official_state(c2i_model)
    state["cls_embedding.embedding_table.weight"] = torch.zeros(10, 32)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(
        CheckpointError, match=r"cls_embedding\.embedding_table\.weight has shape \[10, 32\].*\[11, 32\]"
    ):
        load_gpt(tmp_path / "ckpt.pt", model=tiny_args(), device="cpu")


def test_unexpected_key_is_an_error_naming_the_key(tmp_path: Path, c2i_model: Transformer) -> None:
    state = {**official_state(c2i_model), "layers.9.attention.wo.weight": torch.zeros(32, 32)}
    torch.save({"model": state}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) layers\.9\.attention\.wo\.weight"):
        load_gpt(tmp_path / "ckpt.pt", model=tiny_args(), device="cpu")


def test_t2i_checkpoint_into_c2i_model_is_an_error(tmp_path: Path, t2i_model: Transformer) -> None:
    save_checkpoint(t2i_model, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="cls_embedding"):
        load_gpt(tmp_path / "ckpt.pt", model=tiny_args("c2i"), device="cpu")


def test_dict_without_any_state_dict_is_an_error_listing_its_keys(tmp_path: Path) -> None:
    torch.save({"steps": 3, "note": "nothing here"}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="steps, note"):
        load_gpt(tmp_path / "ckpt.pt", model=tiny_args(), device="cpu")


def test_missing_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_gpt(tmp_path / "nope.pt", model=tiny_args(), device="cpu")


def test_load_gpt_converts_to_the_requested_dtype(tmp_path: Path, c2i_model: Transformer) -> None:
    save_checkpoint(c2i_model, tmp_path / "ckpt.pt")
    loaded = load_gpt(tmp_path / "ckpt.pt", model=tiny_args(), device="cpu", dtype=torch.bfloat16)
    assert loaded.output.weight.dtype == torch.bfloat16 and loaded.freqs_cis.dtype == torch.float32


def test_t2i_checkpoint_loads_with_its_null_caption_buffer(tmp_path: Path) -> None:
    model = tiny_gpt("t2i")
    save_checkpoint(model, tmp_path / "ckpt.pt")
    loaded = load_gpt(tmp_path / "ckpt.pt", model=tiny_args("t2i"), device="cpu")
    assert torch.equal(loaded.cls_embedding.uncond_embedding, model.cls_embedding.uncond_embedding)


def test_preset_names_are_sized_by_task_and_image_size() -> None:
    args = resolve_gpt_args("GPT-B", image_size=384)
    assert (args.block_size, args.cls_token_num, args.task) == (576, 1, "c2i")


def test_model_args_contradicting_image_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="contradicts ModelArgs.block_size"):
        resolve_gpt_args(tiny_args(), image_size=256)


def test_unknown_preset_is_an_error_listing_known_ones() -> None:
    with pytest.raises(ValueError, match="GPT-Q.*GPT-B"):
        ModelArgs.from_name("GPT-Q")


def test_sha256_file_equals_hashlib_digest(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"llamagen" * 100_000)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_vq_reads_training_format_with_codebook_usage(tmp_path: Path) -> None:
    from generator.llamagen import build_vq

    vq = build_vq(TINY_VQ, device="cpu")
    vq.quantize.codebook_used.fill_(3.0)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    torch.save(
        {"model": state, "optimizer": {}, "steps": 5, "args": argparse.Namespace(vq_model="VQ-16")},
        tmp_path / "vq.pt",
    )
    loaded = load_vq(tmp_path / "vq.pt", model=TINY_VQ, device="cpu")
    assert not loaded.training and torch.equal(loaded.quantize.codebook_used, state["quantize.codebook_used"])


def test_load_vq_rejects_a_checkpoint_without_codebook_usage(tmp_path: Path) -> None:
    from generator.llamagen import build_vq

    state = build_vq(TINY_VQ, device="cpu").state_dict()
    del state["quantize.codebook_used"]
    torch.save({"model": state}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="quantize.codebook_used"):
        load_vq(tmp_path / "vq.pt", model=TINY_VQ, device="cpu")
