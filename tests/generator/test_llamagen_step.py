"""Whole decode steps in gemv.c: one call runs every layer and the output head, and gives model.py's numbers;
its sampling probabilities equal sampling.py's tensor operations."""

from __future__ import annotations

import os

import pytest
import torch

from generator.llamagen import gemv
from generator.llamagen.layout import DecodeLayout, apply_layout
from generator.llamagen.model import Transformer
from generator.llamagen.sampling import (
    SamplingParams,
    combine_cfg,
    logits_to_probs,
    make_generators,
    next_token,
    probs_of,
    sample,
)
from tests.generator.conftest import CAPTION_LEN, multinomial_per_row, tiny_gpt

pytestmark = pytest.mark.skipif(not gemv.available() and not os.environ.get("CI"), reason="no C compiler here")

STEPS = DecodeLayout("plain", native_up_to_rows=16, native_steps=True)
MATMULS_ONLY = DecodeLayout("plain", native_up_to_rows=16)


def _decode_logits(model: Transformer, layout: DecodeLayout, rows: int, steps: int, key_ok: torch.Tensor | None
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Logits of `steps` cached decode steps from position 0 in `layout`, and the caches they wrote."""
    apply_layout(model, layout)
    model.clear_caches()
    model.setup_caches(rows, 16)
    tokens = torch.randint(0, model.args.vocab_size, (rows, steps), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        logits = [
            model.decode(tokens[:, i : i + 1], torch.tensor([i]), kv_len=i + 1,
                         mask=None if key_ok is None else key_ok[:, None, None, : i + 1])
            for i in range(steps)
        ]
    cache = model.layers[-1].attention.kv_cache
    assert cache is not None
    return logits, cache.k_cache[:rows, :, :steps].clone(), cache.v_cache[:rows, :, :steps].clone()


@pytest.mark.parametrize(("name", "overrides", "rows"), [
    ("two heads of 16", {}, 2),
    ("vector-wide heads of 32, odd row count", {"dim": 96, "n_head": 3}, 3),
    ("grouped keys: 4 heads share 2", {"dim": 64, "n_head": 4, "n_kv_head": 2}, 4),
    ("rows past 16 KB, run over groups of weight rows with short ends", {"dim": 296, "n_head": 2}, 15),
])
def test_a_step_gives_model_pys_logits_and_cache_at_every_position(name: str, overrides: dict, rows: int) -> None:
    model = tiny_gpt("c2i", **overrides)
    want, want_k, want_v = _decode_logits(model, MATMULS_ONLY, rows, 9, None)
    got, got_k, got_v = _decode_logits(model, STEPS, rows, 9, None)
    for a, b in zip(got, want, strict=True):  # logits of size ~17 at dim 296: float32 rounding reaches 1.5e-5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6)


def test_a_step_hides_the_keys_its_mask_hides() -> None:
    model = tiny_gpt("c2i")
    key_ok = torch.ones(2, 16, dtype=torch.bool)
    key_ok[0, [1, 3, 4]] = False  # the first row never sees keys 1, 3 and 4; the second sees all
    want, _, _ = _decode_logits(model, MATMULS_ONLY, 2, 8, key_ok)
    got, _, _ = _decode_logits(model, STEPS, 2, 8, key_ok)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unmasked, _, _ = _decode_logits(model, STEPS, 2, 8, None)
    assert not torch.allclose(got[-1][0], unmasked[-1][0]) and torch.equal(got[-1][1], unmasked[-1][1])


def test_text_to_image_sampling_with_padded_captions_keeps_its_tokens() -> None:
    plain, model = tiny_gpt("t2i"), tiny_gpt("t2i")
    apply_layout(model, STEPS)
    captions = torch.randn(2, CAPTION_LEN, 24, generator=torch.Generator().manual_seed(1))
    emb_mask = torch.ones(2, CAPTION_LEN, dtype=torch.bool)
    emb_mask[0, :3] = False  # official left padding of a short caption
    kwargs = dict(cfg_scale=3.0, top_k=1, emb_mask=emb_mask)
    assert torch.equal(model.generate(captions, 16, **kwargs), plain.generate(captions, 16, **kwargs))


def test_only_single_position_steps_of_few_enough_rows_run_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt("t2i")
    apply_layout(model, DecodeLayout("plain", native_up_to_rows=2, native_steps=True))
    rows_run: list[int] = []
    real = gemv.decode_step

    def counting(step: gemv.StepModel, x: torch.Tensor, *args: object) -> torch.Tensor:
        rows_run.append(x.shape[0])
        return real(step, x, *args)

    monkeypatch.setattr(gemv, "decode_step", counting)
    captions = torch.randn(1, CAPTION_LEN, 24)
    model.generate(captions, 5, cfg_scale=2.0, top_k=1)  # prefix: 6 positions in torch; 4 steps of 2 rows
    assert rows_run == [2] * 4
    model.generate(torch.randn(2, CAPTION_LEN, 24), 3, cfg_scale=2.0, top_k=1)  # 4 rows: past the limit
    assert rows_run == [2] * 4
    with torch.inference_mode():  # the static-shape decode attends over the whole cache: not a step of the kernel
        model.setup_caches(2, 16)
        model.decode_static(torch.zeros(2, 1, dtype=torch.long), torch.tensor([CAPTION_LEN]),
                            torch.ones(2, 1, 1, 16, dtype=torch.bool))
    assert rows_run == [2] * 4


def test_a_step_does_not_depend_on_the_thread_count() -> None:
    model = tiny_gpt("c2i", dim=256, n_head=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_k, _ = _decode_logits(model, STEPS, 2, 5, None)
        torch.set_num_threads(2)
        two, two_k, _ = _decode_logits(model, STEPS, 2, 5, None)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True)) and torch.equal(one_k, two_k)


def test_tensors_the_kernel_would_misread_are_refused_by_name() -> None:
    model = tiny_gpt("c2i")
    model.setup_caches(2, 16)
    layer = model.layers[0]
    cache = layer.attention.kv_cache
    assert cache is not None
    ff = layer.feed_forward
    w13 = torch.cat([ff.w1.weight, ff.w3.weight]).detach()
    tensors = [layer.attention_norm.weight, layer.attention.wqkv.weight, layer.attention.wo.weight,
               layer.ffn_norm.weight, w13, ff.w2.weight, cache.k_cache, cache.v_cache]

    def step_model(**replace: torch.Tensor) -> gemv.StepModel:
        chosen = [replace.get(name, t) for name, t in zip(gemv.STEP_TENSORS, tensors, strict=True)]
        return gemv.StepModel([tuple(chosen)], model.norm.weight, model.output.weight, 2, 2, 1e-5)

    with pytest.raises(ValueError, match=r"wo is \(32, 31\), the step needs \(32, 32\)"):
        step_model(wo=torch.zeros(32, 31))
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        step_model(w2=ff.w2.weight.t().contiguous().t())
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        step_model(wqkv=layer.attention.wqkv.weight.to(torch.bfloat16))
    cos, sin = model.rope_tables
    x = torch.zeros(2, 32)
    with torch.inference_mode(), pytest.raises(ValueError, match="do not fit caches"):
        gemv.decode_step(step_model(), x, 16, cos[0], sin[0], None)  # past the cache's 16 positions
    with torch.inference_mode(), pytest.raises(ValueError, match="key_ok is"):
        gemv.decode_step(step_model(), x, 3, cos[3], sin[3], torch.ones(2, 2, dtype=torch.bool))


def test_a_step_reads_the_weights_and_caches_the_model_holds_now() -> None:
    model, other = tiny_gpt("c2i", seed=0), tiny_gpt("c2i", seed=1)
    first, _, _ = _decode_logits(model, STEPS, 2, 3, None)  # gathers the step's tensors
    with torch.no_grad():
        model.load_state_dict(other.state_dict())  # in place: the same storage, new values
    reloaded, _, _ = _decode_logits(model, STEPS, 2, 3, None)
    want, _, _ = _decode_logits(other, MATMULS_ONLY, 2, 3, None)
    torch.testing.assert_close(reloaded[-1], want[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[-1], reloaded[-1])

    for m in (model, other):  # `.data = ...` swaps the storage under the same Parameter, caches kept
        m.layers[1].attention.wo.weight.data = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
    assert model._step_built is not None  # what the reloaded run gathered; it must not be read again
    tokens, got, want = torch.zeros(2, 1, dtype=torch.long), [], []
    with torch.inference_mode():
        for i in range(3):
            got.append(model.decode(tokens, torch.tensor([i]), kv_len=i + 1))
            want.append(other.decode(tokens, torch.tensor([i]), kv_len=i + 1))
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("params", "guide"), [
    (SamplingParams(cfg_scale=4.0, top_k=2000), True),
    (SamplingParams(cfg_scale=4.0, top_k=2000), False),  # past cfg_interval: the cond half alone
    (SamplingParams(cfg_scale=1.0, temperature=0.7), True),  # unguided: every row
    (SamplingParams(cfg_scale=2.5, temperature=0.0, top_k=5), True),  # temperature floored at 1e-5: greedy
    (SamplingParams(cfg_scale=1.0, top_k=1), True),
    (SamplingParams(cfg_scale=1.0, top_k=20000), True),  # k past the vocabulary keeps every token
], ids=["cfg top-k", "cond half", "unguided temperature", "greedy by temperature", "top-k 1", "top-k past vocab"])
def test_probabilities_of_the_kernel_equal_the_tensor_operations(params: SamplingParams, guide: bool) -> None:
    logits = torch.randn(4, 16384, generator=torch.Generator().manual_seed(3)) * 3
    got = probs_of(logits, params, guide)
    want = logits_to_probs(combine_cfg(logits, params, guide), params)
    assert got.shape == want.shape and torch.equal(got == 0, want == 0)  # the same tokens filtered out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_top_k_keeps_every_tie_at_the_kth_value_and_nans_reach_the_tensor_operations() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    probs = probs_of(logits, SamplingParams(cfg_scale=1.0, top_k=2), guide=True)
    assert (probs > 0).tolist() == [[True, False, True, True, True, False]]
    assert gemv.probs(torch.tensor([[0.0, float("nan")]]), False, 1.0, 1.0, 0) is None
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        sample(probs_of(torch.tensor([[0.0, float("nan")]]), SamplingParams(cfg_scale=1.0), True),
               [torch.Generator()])


@pytest.mark.parametrize("logits", [[0.0, float("inf")], [float("-inf"), float("-inf")]], ids=["+inf", "all -inf"])
def test_rows_that_are_no_distribution_never_skip_the_draws_checks(logits: list[float]) -> None:
    rows = torch.tensor([logits])
    assert gemv.probs(rows, False, 1.0, 1.0, 0) is None  # the kernel vouches only for distributions
    with pytest.raises(RuntimeError, match="probability tensor contains|invalid multinomial distribution"):
        next_token(rows, SamplingParams(cfg_scale=1.0), True, [torch.Generator()])


def test_the_next_token_is_the_draw_from_the_probabilities_with_or_without_the_checks() -> None:
    logits = torch.randn(8, 1024, generator=torch.Generator().manual_seed(5)) * 2
    params = SamplingParams(cfg_scale=3.0, top_k=50)
    for step in range(20):
        seeds = [step * 10 + row for row in range(4)]
        ours, theirs = make_generators(seeds, 4, "cpu"), make_generators(seeds, 4, "cpu")
        scaled = logits * (1 + step / 10)
        got = next_token(scaled, params, True, ours)
        assert torch.equal(got, multinomial_per_row(probs_of(scaled, params, True), theirs))
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))


def test_greedy_rows_give_the_draws_token_without_drawing_and_ties_still_draw() -> None:
    logits = torch.randn(8, 1024, generator=torch.Generator().manual_seed(7))
    params = SamplingParams(cfg_scale=1.0, top_k=1)
    seeds = list(range(8))

    ours, theirs, untouched = (make_generators(seeds, 8, "cpu") for _ in range(3))
    want = multinomial_per_row(probs_of(logits, params, True), theirs)
    assert torch.equal(next_token(logits, params, True, ours), want)
    assert torch.equal(next_token(logits, params, True, ours), logits.argmax(dim=-1, keepdim=True))
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, untouched, strict=True))  # no draw

    tied = logits.clone()
    tied[3, 10] = tied[3, 20] = tied[3].max() + 1  # top-k 1 keeps both: row 3 is a coin toss
    ours, theirs = make_generators(seeds, 8, "cpu"), make_generators(seeds, 8, "cpu")
    want = multinomial_per_row(probs_of(tied, params, True), theirs)
    assert torch.equal(next_token(tied, params, True, ours), want)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))
