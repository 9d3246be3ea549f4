"""LlamaGen GPT architecture: official keys and shapes, 2D RoPE, teacher-forced logits, training forward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from generator.llamagen import ModelArgs, Transformer
from generator.llamagen.rope import apply_rotary_emb, precompute_freqs_cis_2d
from tests.generator.conftest import CAPTION_LEN, tiny_args, tiny_gpt

KEYS_DIR = Path("/work/shared/docs/llamagen-keys")
GPT_LISTINGS = sorted(KEYS_DIR.glob("GPT-*.tsv")) if KEYS_DIR.is_dir() else []


def read_listing(path: Path) -> dict[str, list[int]]:
    rows = (line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: ast.literal_eval(shape) for key, shape, _ in rows}


@pytest.mark.skipif(not GPT_LISTINGS, reason="shared llamagen-keys listings are not available")
@pytest.mark.parametrize("listing", GPT_LISTINGS, ids=lambda p: p.stem)
def test_state_dict_keys_and_shapes_equal_official_listing(listing: Path) -> None:
    name, task = listing.stem.rsplit("_", 1)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name, task=task))  # type: ignore[arg-type]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == read_listing(listing)


def test_gpt_b_c2i_state_dict_has_88_keys_even_with_caches_attached() -> None:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("GPT-B"))
    model.setup_caches(2, 264)
    keys = list(model.state_dict())
    assert len(keys) == 88
    assert not [k for k in keys if "freqs_cis" in k or "kv_cache" in k]


@pytest.mark.parametrize(
    ("name", "ffn", "head_dim"), [("GPT-B", 2048, 64), ("GPT-XL", 3584, 64), ("GPT-3B", 8704, 100)]
)
def test_ffn_width_and_head_dim_follow_official_rule(name: str, ffn: int, head_dim: int) -> None:
    args = ModelArgs.from_name(name)
    assert (args.ffn_hidden_dim, args.head_dim) == (ffn, head_dim)


def test_preset_block_size_comes_from_image_size_and_task_sets_prefix_length() -> None:
    args = ModelArgs.from_name("GPT-XL", task="t2i", image_size=512)
    assert (args.block_size, args.grid_size, args.cls_token_num) == (1024, 32, 120)


def test_block_size_must_be_a_perfect_square() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        tiny_args(block_size=15)


def test_rotary_prefix_rows_are_zero_and_first_image_token_is_identity() -> None:
    table = precompute_freqs_cis_2d(grid_size=4, head_dim=16, base=10000.0, cls_token_num=3)
    assert table.shape == (3 + 16, 8, 2)
    assert torch.count_nonzero(table[:3]) == 0
    assert torch.equal(table[3, :, 0], torch.ones(8)) and torch.equal(table[3, :, 1], torch.zeros(8))


def test_identity_prefix_rows_leave_the_prefix_unrotated_and_the_image_rows_unchanged() -> None:
    official = precompute_freqs_cis_2d(grid_size=4, head_dim=16, base=10000.0, cls_token_num=3)
    table = precompute_freqs_cis_2d(grid_size=4, head_dim=16, base=10000.0, cls_token_num=3, prefix="identity")
    assert torch.equal(table[:3, :, 0], torch.ones(3, 8)) and torch.count_nonzero(table[:3, :, 1]) == 0
    assert torch.equal(table[3:], official[3:])


def test_prefix_rotary_defaults_to_the_official_zero_rows_and_refuses_unknown_values() -> None:
    assert tiny_args("t2i").prefix_rotary == "zero"
    assert torch.count_nonzero(tiny_gpt("t2i").freqs_cis[: tiny_args("t2i").cls_token_num]) == 0
    with pytest.raises(ValueError, match="prefix_rotary"):
        tiny_args("t2i", prefix_rotary="ones")


def caption_attention(model: Transformer, emb: torch.Tensor) -> torch.Tensor:
    """First layer's attention weights [heads, P] of the first image token over the caption tokens."""
    attention = model.layers[0].attention
    seen: list[tuple] = []
    hook = attention.register_forward_pre_hook(lambda module, inputs: seen.append(inputs) and None)
    model.forward_logits(emb, torch.zeros(1, 1, dtype=torch.long))
    hook.remove()
    x, rope = seen[0][:2]  # normed input [1, P + 1, D] and its rotary tables
    with torch.inference_mode():
        q, k, _ = attention._qkv(x, rope)  # [1, H, P + 1, d]
    P = model.prefix_len
    return (q[0, :, P] @ k[0, :, :P].transpose(-1, -2)).softmax(-1)


def test_zero_prefix_rows_weigh_every_caption_token_alike_and_identity_rows_attend_by_content() -> None:
    torch.manual_seed(0)
    emb = torch.randn(1, CAPTION_LEN, tiny_args("t2i").caption_dim)
    uniform = torch.full((2, CAPTION_LEN), 1.0 / CAPTION_LEN)
    assert torch.allclose(caption_attention(tiny_gpt("t2i"), emb), uniform)
    assert not torch.allclose(caption_attention(tiny_gpt("t2i", prefix_rotary="identity"), emb), uniform, atol=1e-3)


def test_rotary_first_half_turns_with_row_and_second_half_with_column() -> None:
    table = precompute_freqs_cis_2d(grid_size=4, head_dim=16, base=10000.0, cls_token_num=1)
    angle = torch.atan2(table[..., 1], table[..., 0])  # (1 + 16, 8)
    row1_col0, row0_col1 = angle[1 + 4], angle[1 + 1]
    assert torch.allclose(row1_col0[:4], torch.tensor([10000.0 ** (-i / 4) for i in range(4)]))
    assert torch.count_nonzero(row1_col0[4:]) == 0
    assert torch.count_nonzero(row0_col1[:4]) == 0
    assert row0_col1[4] == pytest.approx(1.0)


def test_rotary_rotates_adjacent_pairs_not_halves() -> None:
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # the pair (x0, x1) = (1, 0)
    freqs = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # pair 0 by 90 degrees, pair 1 identity
    assert torch.equal(apply_rotary_emb(x, freqs).flatten(), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_rotary_table_is_not_state_and_stays_float32_under_bf16() -> None:
    model = tiny_gpt().to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.float32
    assert "freqs_cis" not in model.state_dict()


def test_forward_logits_returns_prefix_row_plus_one_row_per_token_in_float32(c2i_model: Transformer) -> None:
    logits = c2i_model.forward_logits(torch.tensor([1, 2, 3]), torch.randint(0, 64, (3, 5)))
    assert logits.shape == (3, 6, 64) and logits.dtype == torch.float32


def test_forward_logits_accepts_zero_tokens_and_full_block(c2i_model: Transformer) -> None:
    cond = torch.tensor([4])
    assert c2i_model.forward_logits(cond, torch.zeros(1, 0, dtype=torch.long)).shape == (1, 1, 64)
    assert c2i_model.forward_logits(cond, torch.zeros(1, 16, dtype=torch.long)).shape == (1, 17, 64)


def test_forward_logits_row_i_sees_only_tokens_before_i(c2i_model: Transformer) -> None:
    tokens = torch.randint(0, 64, (1, 8))
    changed = tokens.clone()
    changed[0, 5] = (tokens[0, 5] + 1) % 64
    a = c2i_model.forward_logits(torch.tensor([2]), tokens)
    b = c2i_model.forward_logits(torch.tensor([2]), changed)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_null_class_id_is_num_classes_and_changes_logits(c2i_model: Transformer) -> None:
    tokens = torch.randint(0, 64, (1, 4))
    null = c2i_model.forward_logits(torch.tensor([10]), tokens)
    cond = c2i_model.forward_logits(torch.tensor([3]), tokens)
    assert not torch.allclose(null, cond)
    assert torch.equal(c2i_model.null_condition(torch.tensor([3, 7])), torch.tensor([10, 10]))


def test_t2i_padding_caption_rows_do_not_change_image_logits(
    t2i_model: Transformer, captions: tuple[torch.Tensor, torch.Tensor]
) -> None:
    emb, mask = captions
    tokens = torch.randint(0, 64, (2, 5))
    noisy = emb + torch.randn_like(emb) * (1 - mask[..., None])  # only padding rows change
    a = t2i_model.forward_logits(emb, tokens, mask)
    b = t2i_model.forward_logits(noisy, tokens, mask)
    assert torch.allclose(a, b, atol=1e-6)


def test_t2i_condition_must_have_caption_shape(t2i_model: Transformer) -> None:
    with pytest.raises(ValueError, match="caption features"):
        t2i_model.forward_logits(torch.randn(1, 5, 24), torch.zeros(1, 2, dtype=torch.long))


def test_forward_logits_ignores_dropout_even_in_train_mode(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([1]), torch.randint(0, 64, (1, 6))
    expected = c2i_model.forward_logits(cond, tokens)
    assert torch.equal(c2i_model.train().forward_logits(cond, tokens), expected)


def test_forward_train_applies_dropout_in_train_mode(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 6))
    c2i_model.train()
    a, _ = c2i_model.forward_train(cond, tokens)
    b, _ = c2i_model.forward_train(cond, tokens)
    assert not torch.equal(a, b)


def test_forward_train_in_eval_mode_equals_forward_logits(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([1, 2]), torch.randint(0, 64, (2, 6))
    logits, loss = c2i_model.forward_train(cond, tokens)
    assert loss is None
    assert torch.equal(logits, c2i_model.forward_logits(cond, tokens))


def test_forward_train_loss_is_cross_entropy_over_every_row_and_backpropagates(
    c2i_model: Transformer,
) -> None:
    cond, targets = torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    logits, loss = c2i_model.train().forward_train(cond, targets[:, :-1], targets=targets)
    assert loss is not None and logits.shape == (2, 16, 64)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert c2i_model.tok_embeddings.weight.grad is not None


def test_label_dropout_replaces_classes_with_null_class_in_train_mode() -> None:
    model = tiny_gpt(class_dropout_prob=1.0).train()
    prefix = model.embed_condition(torch.tensor([1, 2]), train=True)
    null = model.cls_embedding.embedding_table.weight[10]
    assert torch.equal(prefix[:, 0], null.expand(2, -1))


def test_official_init_zeroes_output_head_and_draws_linears_with_std_002() -> None:
    from generator.llamagen import build_gpt

    torch.manual_seed(0)
    model = build_gpt(tiny_args(dim=256, n_head=4), device="cpu")
    assert torch.count_nonzero(model.output.weight) == 0
    assert model.layers[0].feed_forward.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
