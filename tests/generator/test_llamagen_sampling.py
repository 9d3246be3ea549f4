"""Sampling: cached decoding equals full recomputation, official CFG, top-k/top-p semantics, seeds."""

from __future__ import annotations

import pytest
import torch

from generator.llamagen import SamplingParams, Transformer
from generator.llamagen.sampling import (
    combine_cfg,
    logits_to_probs,
    make_generators,
    sample,
    top_k_filter_,
    top_p_filter_,
)
from tests.generator.conftest import multinomial_per_row, tiny_gpt


def reference_generate(
    model: Transformer,
    cond: torch.Tensor,
    n: int,
    params: SamplingParams,
    seed: int,
    emb_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official procedure recomputed from scratch with forward_logits at every step (no caches)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    null = model.null_condition(cond)
    for step in range(n):
        logits = model.forward_logits(cond, tokens, emb_mask)[:, -1]
        # The prefill token is guided; decode iteration i = step - 1 stops guidance after cfg_interval.
        guide = step == 0 or not (params.cfg_interval > -1 and step - 1 > params.cfg_interval)
        if params.guided and guide:
            uncond = model.forward_logits(null, tokens, emb_mask)[:, -1]
            logits = uncond + (logits - uncond) * params.cfg_scale
        nxt = torch.multinomial(logits_to_probs(logits, params), 1, generator=gen)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def test_cached_greedy_decode_equals_teacher_forced_argmax(c2i_model: Transformer) -> None:
    cond = torch.tensor([3, 7])
    ids = c2i_model.generate(cond, 16, cfg_scale=1.0, top_k=1)
    assert torch.equal(c2i_model.forward_logits(cond, ids[:, :-1]).argmax(-1), ids)


def test_cached_prefill_and_decode_logits_equal_full_recomputation(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([5]), torch.randint(0, 64, (1, 10))
    full = c2i_model.forward_logits(cond, tokens)
    c2i_model.setup_caches(1, 16)
    with torch.inference_mode():
        cached = [c2i_model.prefill(cond, torch.arange(1))]
        for i in range(10):
            pos = 1 + i
            cached.append(c2i_model.decode(tokens[:, i : i + 1], torch.tensor([pos]), kv_len=pos + 1))
    assert torch.allclose(torch.stack(cached, dim=1), full, atol=1e-5)


def test_static_whole_cache_decode_equals_prefix_only_decode(c2i_model: Transformer) -> None:
    cond, tokens = torch.tensor([5]), torch.randint(0, 64, (1, 6))
    c2i_model.setup_caches(1, 16)
    key_ok = torch.ones(1, 1, 1, 16, dtype=torch.bool)
    with torch.inference_mode():
        c2i_model.prefill(cond, torch.arange(1))
        for i in range(6):
            pos = torch.tensor([1 + i])
            sliced = c2i_model.decode(tokens[:, i : i + 1], pos, kv_len=2 + i)
            static = c2i_model.decode_static(tokens[:, i : i + 1], pos, key_ok)
            assert torch.allclose(sliced, static, atol=1e-6)


def test_t2i_cached_greedy_decode_equals_teacher_forced_argmax(
    t2i_model: Transformer, captions: tuple[torch.Tensor, torch.Tensor]
) -> None:
    emb, mask = captions
    ids = t2i_model.generate(emb, 16, cfg_scale=1.0, top_k=1, emb_mask=mask)
    assert torch.equal(t2i_model.forward_logits(emb, ids[:, :-1], mask).argmax(-1), ids)


def test_t2i_with_unrotated_caption_tokens_decodes_like_full_recomputation(
    captions: tuple[torch.Tensor, torch.Tensor],
) -> None:
    model, (emb, mask) = tiny_gpt("t2i", prefix_rotary="identity"), captions
    params = SamplingParams(cfg_scale=3.0, top_k=10)
    ids = model.generate(emb[:1], 12, cfg_scale=3.0, top_k=10, seed=4, emb_mask=mask[:1])
    assert torch.equal(ids, reference_generate(model, emb[:1], 12, params, seed=4, emb_mask=mask[:1]))


def test_sampled_tokens_equal_full_recompute_reference_with_official_cfg(c2i_model: Transformer) -> None:
    params = SamplingParams(cfg_scale=4.0, top_k=20, top_p=0.95, temperature=0.9)
    ids = c2i_model.generate(torch.tensor([2]), 16, cfg_scale=4.0, top_k=20, top_p=0.95, temperature=0.9, seed=11)
    assert torch.equal(ids, reference_generate(c2i_model, torch.tensor([2]), 16, params, seed=11))


def test_t2i_sampled_tokens_equal_reference_with_null_caption_under_prompt_mask(
    t2i_model: Transformer, captions: tuple[torch.Tensor, torch.Tensor]
) -> None:
    emb, mask = captions
    params = SamplingParams(cfg_scale=3.0, top_k=10)
    ids = t2i_model.generate(emb[:1], 12, cfg_scale=3.0, top_k=10, seed=4, emb_mask=mask[:1])
    assert torch.equal(ids, reference_generate(t2i_model, emb[:1], 12, params, seed=4, emb_mask=mask[:1]))


def test_cfg_interval_guides_prefill_and_iterations_up_to_interval_only(c2i_model: Transformer) -> None:
    params = SamplingParams(cfg_scale=5.0, cfg_interval=3)
    ids = c2i_model.generate(torch.tensor([6]), 16, cfg_scale=5.0, cfg_interval=3, seed=2)
    assert torch.equal(ids, reference_generate(c2i_model, torch.tensor([6]), 16, params, seed=2))


def test_cfg_scale_one_equals_unguided_sampling(c2i_model: Transformer) -> None:
    ids = c2i_model.generate(torch.tensor([8]), 16, cfg_scale=1.0, seed=3)
    unguided = reference_generate(c2i_model, torch.tensor([8]), 16, SamplingParams(cfg_scale=0.0), seed=3)
    assert torch.equal(ids, unguided)


def test_cfg_combination_at_scale_one_is_the_conditional_half() -> None:
    logits = torch.randn(4, 8)
    combined = logits[2:] + (logits[:2] - logits[2:]) * 1.0
    assert torch.allclose(combined, logits[:2])
    assert torch.equal(combine_cfg(logits[:2], SamplingParams(cfg_scale=1.0), guide=True), logits[:2])


def test_cfg_rows_are_conditional_first_then_null() -> None:
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    combined = combine_cfg(torch.cat([cond, uncond]), SamplingParams(cfg_scale=3.0), guide=True)
    assert torch.equal(combined, torch.tensor([[4.0, -2.0]]))


def test_top_k_keeps_every_tie_at_the_kth_value() -> None:
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    top_k_filter_(logits, 2)
    assert torch.isinf(logits).tolist() == [[False, False, False, False, True]]


def test_top_p_keeps_the_first_token_past_the_threshold() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    top_p_filter_(logits, 0.6)  # 0.5 < 0.6, 0.8 crosses it: the 0.3 token is kept, the rest dropped
    assert torch.isinf(logits).tolist() == [[False, False, True, True]]


def test_top_p_never_drops_the_most_likely_token() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    top_p_filter_(logits, 0.01)
    assert torch.isinf(logits).tolist() == [[False, True, True]]


def test_filters_run_after_temperature_and_temperature_zero_is_greedy() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    probs = logits_to_probs(logits, SamplingParams(temperature=0.0))
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0]]))


def test_logits_to_probs_leaves_the_callers_logits_untouched() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    logits_to_probs(logits, SamplingParams(top_k=1))
    assert torch.equal(logits, torch.tensor([[2.0, 1.0, 0.5]]))


def test_same_seed_gives_same_tokens(c2i_model: Transformer) -> None:
    a = c2i_model.generate(torch.tensor([1, 2]), 16, seed=123)
    b = c2i_model.generate(torch.tensor([1, 2]), 16, seed=123)
    assert torch.equal(a, b)


def test_different_seeds_give_different_tokens(c2i_model: Transformer) -> None:
    a = c2i_model.generate(torch.tensor([1]), 16, seed=1)
    b = c2i_model.generate(torch.tensor([1]), 16, seed=2)
    assert not torch.equal(a, b)


def test_int_seed_reproduces_global_manual_seed_draws() -> None:
    probs = torch.softmax(torch.randn(3, 50), dim=-1)
    (gen,) = make_generators(9, 3, "cpu")
    ours = torch.multinomial(probs, 1, generator=gen)
    torch.manual_seed(9)
    assert torch.equal(ours, torch.multinomial(probs, 1))


@pytest.mark.parametrize("vocab", [50, 16384])
def test_draws_are_torch_multinomials_for_per_row_and_shared_generators(vocab: int) -> None:
    """The same tokens and the same generator states as torch.multinomial, over rows with ties and zeros."""
    ours, theirs = make_generators([1, 2, 3], 3, "cpu"), make_generators([1, 2, 3], 3, "cpu")
    (shared_ours,), (shared_theirs,) = make_generators(7, 3, "cpu"), make_generators(7, 3, "cpu")
    for step in range(60):
        logits = torch.randn(3, vocab) * 3
        if step % 3 == 0:
            logits[:, : vocab // 2] = float("-inf")  # zero probabilities
        if step % 4 == 0:
            logits[:, 7] = logits[:, 9] = logits.max() + 1  # two equally likely best tokens
        probs = torch.softmax(logits, dim=-1)
        assert torch.equal(sample(probs, ours), multinomial_per_row(probs, theirs))
        assert torch.equal(sample(probs, [shared_ours]), torch.multinomial(probs, 1, generator=shared_theirs))
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("fault", ["nan", "negative", "no mass"])
def test_a_row_that_is_no_distribution_is_refused_as_torch_multinomial_refuses_it(fault: str) -> None:
    probs = torch.softmax(torch.randn(2, 50), dim=-1)
    probs[1] = {"nan": float("nan"), "negative": -0.1, "no mass": 0.0}[fault]
    with pytest.raises(RuntimeError, match="probability tensor|invalid multinomial distribution"):
        sample(probs, make_generators([1, 2], 2, "cpu"))


def test_each_row_of_a_batch_gets_the_tokens_it_gets_alone(c2i_model: Transformer) -> None:
    batch = c2i_model.generate(torch.tensor([1, 2, 3]), 16, top_k=30, seed=[10, 20, 30])
    alone = [c2i_model.generate(torch.tensor([c]), 16, top_k=30, seed=[s]) for c, s in [(1, 10), (2, 20), (3, 30)]]
    assert torch.equal(batch, torch.cat(alone))


def test_t2i_rows_with_different_masks_and_seeds_match_single_runs(
    t2i_model: Transformer, captions: tuple[torch.Tensor, torch.Tensor]
) -> None:
    emb, mask = captions
    batch = t2i_model.generate(emb, 12, cfg_scale=2.0, seed=[5, 6], emb_mask=mask)
    alone = [
        t2i_model.generate(emb[i : i + 1], 12, cfg_scale=2.0, seed=[s], emb_mask=mask[i : i + 1])
        for i, s in [(0, 5), (1, 6)]
    ]
    assert torch.equal(batch, torch.cat(alone))


def test_seed_count_must_match_batch(c2i_model: Transformer) -> None:
    with pytest.raises(ValueError, match="seeds for a batch of 2"):
        c2i_model.generate(torch.tensor([1, 2]), 4, seed=[1, 2, 3])


def test_generate_returns_int64_and_supports_a_single_token(c2i_model: Transformer) -> None:
    ids = c2i_model.generate(torch.tensor([1]), 1)
    assert ids.shape == (1, 1) and ids.dtype == torch.int64


def test_generate_rejects_more_tokens_than_block_size(c2i_model: Transformer) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        c2i_model.generate(torch.tensor([1]), 17)


def test_training_forward_still_works_after_generate(c2i_model: Transformer) -> None:
    c2i_model.generate(torch.tensor([1]), 8)
    logits, _ = c2i_model.train().forward_train(torch.tensor([1]), torch.randint(0, 64, (1, 4)))
    assert logits.shape == (1, 5, 64)


def test_grouped_query_attention_decodes_like_full_recomputation() -> None:
    model = tiny_gpt(n_head=4, n_kv_head=2, dim=64)
    ids = model.generate(torch.tensor([4]), 16, cfg_scale=2.0, top_k=1)
    params = SamplingParams(cfg_scale=2.0, top_k=1)
    assert torch.equal(ids, reference_generate(model, torch.tensor([4]), 16, params, seed=0))


def test_bf16_generation_runs_with_float32_logits() -> None:
    model = tiny_gpt().to(torch.bfloat16)
    logits = model.forward_logits(torch.tensor([1]), torch.randint(0, 64, (1, 3)))
    ids = model.generate(torch.tensor([1]), 8, seed=0)
    assert logits.dtype == torch.float32 and ids.shape == (1, 8)


def test_sampling_params_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_static_decode_on_cuda_gives_the_eager_greedy_tokens() -> None:
    model = tiny_gpt().cuda()
    cond = torch.tensor([1, 2], device="cuda")
    eager = model.generate(cond, 16, cfg_scale=3.0, top_k=1)
    assert torch.equal(model.generate(cond, 16, cfg_scale=3.0, top_k=1, compile=True), eager)


def test_compiled_static_decode_on_cpu_gives_the_eager_tokens(captions: tuple[torch.Tensor, torch.Tensor]) -> None:
    c2i, t2i = tiny_gpt("c2i"), tiny_gpt("t2i")
    emb, mask = captions
    for model, cond, kwargs in ((c2i, torch.tensor([1, 2]), {}), (t2i, emb, {"emb_mask": mask})):
        for top_k in (1, 20):  # greedy, and sampled with per-row seeds
            eager = model.generate(cond, 16, cfg_scale=3.0, top_k=top_k, seed=[5, 6], **kwargs)
            compiled = model.generate(cond, 16, cfg_scale=3.0, top_k=top_k, seed=[5, 6], compile=True, **kwargs)
            assert torch.equal(compiled, eager)


def test_compiled_cpu_decode_follows_weights_loaded_after_it_was_compiled() -> None:
    model, cond = tiny_gpt("c2i", seed=0), torch.tensor([1, 2])
    model.generate(cond, 16, cfg_scale=3.0, top_k=1, compile=True)  # compiled with the seed-0 weights
    for seed, assign in ((1, False), (2, True)):  # copied into the same tensors, then new tensors
        other = tiny_gpt("c2i", seed=seed)
        model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=assign)
        expected = other.generate(cond, 16, cfg_scale=3.0, top_k=1)
        assert torch.equal(model.generate(cond, 16, cfg_scale=3.0, top_k=1, compile=True), expected)


def test_head_dim_100_as_in_gpt_3b_decodes_like_full_recomputation() -> None:
    model = tiny_gpt(dim=200, n_head=2)  # head_dim 100: 25 rotary frequencies per axis
    ids = model.generate(torch.tensor([3]), 16, cfg_scale=1.0, top_k=1)
    assert torch.equal(model.forward_logits(torch.tensor([3]), ids[:, :-1]).argmax(-1), ids)
