"""CPU decode weight layouts: every layout computes the same model, and the timed choice keeps the fastest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator.llamagen import gemv, load_gpt, save_checkpoint
from generator.llamagen.layout import DecodeLayout, apply_layout, choose_decode_layout
from generator.llamagen.packing import linear, pack, packing_available
from tests.generator.conftest import tiny_args, tiny_gpt

COND, TOKENS = torch.tensor([2, 5]), torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(0))
LAYOUTS = [
    DecodeLayout("plain"),
    DecodeLayout("streaming"),
    DecodeLayout("plain", packed_from_rows=1),
    DecodeLayout("streaming", packed_from_rows=3),
    DecodeLayout("plain", native_up_to_rows=16),
    DecodeLayout("plain", packed_from_rows=3, native_up_to_rows=2),
    DecodeLayout("plain", native_up_to_rows=16, native_steps=True),
    DecodeLayout("plain", packed_from_rows=3, native_up_to_rows=2, native_steps=True),
]
CANDIDATES = {"plain", "streaming"} | ({"gemv.c", "gemv.c steps"} if gemv.available() else set())


def _weights_contiguous(model: torch.nn.Module) -> list[bool]:
    return [m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_every_layout_gives_the_plain_models_logits_tokens_and_state(layout: DecodeLayout) -> None:
    plain, model = tiny_gpt("c2i"), tiny_gpt("c2i")
    apply_layout(model, layout, min_elements=0)  # pack even the tiny weights
    assert model.decode_layout == str(layout)
    assert torch.allclose(model.forward_logits(COND, TOKENS), plain.forward_logits(COND, TOKENS), atol=1e-5)
    kwargs = dict(cfg_scale=4.0, top_k=20, seed=[3, 4])
    assert torch.equal(model.generate(COND, 16, **kwargs), plain.generate(COND, 16, **kwargs))
    a, b = plain.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_copies_serve_only_calls_with_enough_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(96, 64)
    packed = pack(w, min_elements=0, min_rows=3)
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    with torch.inference_mode():
        for rows in (1, 2, 3, 16):
            out = linear(torch.randn(rows, 64), w, packed)
            assert out.shape == (rows, 96)
        linear(torch.randn(1, 2, 64), w, packed)  # 2 rows over two leading dimensions
    assert calls == [3, 16]


def test_layouts_can_be_switched_back_and_forth_without_changing_a_value() -> None:
    plain, model = tiny_gpt("c2i"), tiny_gpt("c2i")
    for layout in (LAYOUTS[1], LAYOUTS[2], LAYOUTS[3], LAYOUTS[0]):
        apply_layout(model, layout, min_elements=0)
    assert all(_weights_contiguous(model))
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True))
    apply_layout(model, DecodeLayout("streaming"))
    assert not any(_weights_contiguous(model))


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown layout 'columnar'"):
        apply_layout(tiny_gpt("c2i"), DecodeLayout("columnar"))  # type: ignore[arg-type]


def test_the_timed_choice_is_applied_and_leaves_no_scratch_cache() -> None:
    model = tiny_gpt("c2i")
    chosen, timings = choose_decode_layout(model, rounds=1, steps=2)
    assert model.decode_layout == str(chosen)
    assert set(timings) == CANDIDATES  # no weight is big enough to pack: packing is not a candidate
    assert chosen.packed_from_rows is None
    assert all(set(by_rows) == {2, 16} and min(by_rows.values()) > 0 for by_rows in timings.values())
    fastest = min(timings, key=lambda name: timings[name][2])
    if fastest.startswith("gemv.c"):
        assert chosen.base == "plain" and chosen.native_up_to_rows in (2, 16)
        assert chosen.native_steps == (fastest == "gemv.c steps")
    else:
        assert chosen.base == fastest and chosen.native_up_to_rows is None
    assert model.max_seq_length == 0 and model.layers[0].attention.kv_cache is None


def test_models_that_are_not_float32_on_cpu_stay_plain_untimed() -> None:
    model = tiny_gpt("c2i").to(torch.bfloat16)
    assert choose_decode_layout(model) == (DecodeLayout(), {})
    assert all(_weights_contiguous(model))


def test_load_gpt_takes_a_fixed_layout_or_times_them(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(tiny_gpt("c2i"), path)
    assert load_gpt(path, model=tiny_args(), device="cpu", layout=DecodeLayout()).decode_layout == "plain"
    streaming = load_gpt(path, model=tiny_args(), device="cpu", layout=DecodeLayout("streaming"))
    assert streaming.decode_layout == "streaming" and not any(_weights_contiguous(streaming))
    assert load_gpt(path, model=tiny_args(), device="cpu").decode_layout.split(",")[0] in ("plain", "streaming")


def test_a_slow_model_is_timed_once_per_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    from generator.llamagen import layout

    calls: list[tuple[int, int]] = []

    def slow_step(model: object, rows: int = 2, steps: int = 3) -> float:
        calls.append((rows, steps))
        return 0.5 if rows == 2 else 1.0

    monkeypatch.setattr(layout, "time_decode_step", slow_step)
    chosen, _ = choose_decode_layout(tiny_gpt("c2i"))
    assert chosen.base == "plain"  # a tie keeps the first candidate
    assert calls[0] == (2, 1) and all(steps == 1 for _, steps in calls)
    assert len(calls) == 1 + len(CANDIDATES) * 2  # the probe, then each candidate once at 2 and at 16 rows


@pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN packed linears")
def test_packing_is_a_candidate_once_a_weight_is_big_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    from generator.llamagen import packing

    monkeypatch.setattr(packing, "PACK_MIN_ELEMENTS", 0)
    _, timings = choose_decode_layout(tiny_gpt("c2i"), rounds=1, steps=1)
    assert set(timings) == CANDIDATES | {"packed"}


def test_the_layout_reads_as_a_phrase() -> None:
    assert str(DecodeLayout("plain", packed_from_rows=1)) == "plain, packed from 1 row"
    assert str(DecodeLayout("streaming", packed_from_rows=3)) == "streaming, packed from 3 rows"
    assert str(DecodeLayout("plain", 3, native_up_to_rows=2)) == "plain, gemv.c up to 2 rows, packed from 3 rows"
    assert str(DecodeLayout("plain", None, 16, native_steps=True)) == "plain, gemv.c steps up to 16 rows"


def test_gemv_c_needs_the_plain_base_layout_and_its_steps_a_row_count() -> None:
    with pytest.raises(ValueError, match="gemv.c reads row-major weights"):
        apply_layout(tiny_gpt("c2i"), DecodeLayout("streaming", native_up_to_rows=2))
    with pytest.raises(ValueError, match="gemv.c steps need the row count"):
        apply_layout(tiny_gpt("c2i"), DecodeLayout("plain", native_steps=True))


@pytest.mark.parametrize(("timings", "expected"), [
    ({"plain": (3, 9), "streaming": (4, 9), "packed": (5, 6), "gemv.c": (1, 8)}, DecodeLayout("plain", 3, 2)),
    ({"plain": (3, 9), "streaming": (4, 9), "gemv.c": (1, 8)}, DecodeLayout("plain", native_up_to_rows=16)),
    ({"plain": (3, 7), "streaming": (4, 9), "gemv.c": (1, 8)}, DecodeLayout("plain", native_up_to_rows=2)),
    ({"plain": (3, 9), "streaming": (2, 9), "packed": (5, 6), "gemv.c": (4, 5)}, DecodeLayout("streaming", 3)),
    ({"plain": (3, 9), "streaming": (4, 9), "packed": (5, 6), "gemv.c": (2, 8), "gemv.c steps": (1, 7)},
     DecodeLayout("plain", 3, 2, native_steps=True)),
    ({"plain": (3, 9), "streaming": (4, 9), "packed": (5, 6), "gemv.c": (2, 8), "gemv.c steps": (1, 5)},
     DecodeLayout("plain", native_up_to_rows=16, native_steps=True)),
    ({"plain": (3, 9), "streaming": (4, 9), "gemv.c": (1, 8), "gemv.c steps": (2, 7)},
     DecodeLayout("plain", native_up_to_rows=16)),  # steps are faster at 16, but one kind per layout
    ({"plain": (3, 9), "streaming": (4, 9), "gemv.c": (2, 5), "gemv.c steps": (1, 7)},
     DecodeLayout("plain", native_up_to_rows=16, native_steps=True)),  # steps still beat plain at 16
], ids=["gemv.c at 2 rows, packed past", "gemv.c everywhere", "gemv.c at 2 rows, plain past", "gemv.c slower",
        "steps at 2 rows, packed past", "steps everywhere", "matmuls alone, beating the BLAS paths at 16",
        "steps at 2 rows, other gemv.c kind fastest at 16"])
def test_the_choice_runs_each_row_count_with_its_fastest_candidate(
        timings: dict[str, tuple[float, float]], expected: DecodeLayout) -> None:
    from generator.llamagen.layout import _combine

    assert _combine({name: {2: few, 16: many} for name, (few, many) in timings.items()}) == expected


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_a_recorded_layout_reads_back_as_itself(layout: DecodeLayout) -> None:
    assert DecodeLayout.parse(str(layout)) == layout


@pytest.mark.parametrize("text", ["columnar", "plain, packed from many rows", "plain, zipped"])
def test_an_unknown_recorded_layout_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown decode layout"):
        DecodeLayout.parse(text)
