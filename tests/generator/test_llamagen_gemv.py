"""generator/llamagen/gemv.py: our few-row CPU matmul, built with the machine's C compiler, equals F.linear."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generator.llamagen import gemv
from generator.llamagen.packing import linear

# The kernel is built wherever a C compiler is (CI machines have gcc); without one it is simply not a candidate.
needs_kernel = pytest.mark.skipif(not gemv.available() and not os.environ.get("CI"), reason="no C compiler here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("features", [64, 70, 768])  # 70: a tail shorter than one vector pair
def test_the_kernel_equals_f_linear_for_any_row_count_and_width(rows: int, features: int) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + features)
    x, w = torch.randn(rows, features, generator=generator), torch.randn(96, features, generator=generator)
    with torch.inference_mode():
        got = gemv.linear(x, w)
    assert got.shape == (rows, 96)
    # Sums of 768 products of size ~28 differ from the BLAS order by float32 rounding (~2e-5).
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_many_rows_run_in_groups_of_weight_rows_with_each_rows_own_sums() -> None:
    generator = torch.Generator().manual_seed(1)
    x, w = torch.randn(15, 768, generator=generator), torch.randn(70, 768, generator=generator)  # 45 KB of x
    with torch.inference_mode():
        together = gemv.linear(x, w)  # 16 weight rows at a time, 4-row chunks of x, a short last group
        alone = torch.cat([gemv.linear(row[None], w) for row in x])
    assert torch.equal(together, alone)


@needs_kernel
def test_leading_dimensions_and_a_non_contiguous_input_are_kept() -> None:
    x, w = torch.randn(2, 1, 64 * 2)[..., ::2], torch.randn(48, 64)  # every other feature: strided
    with torch.inference_mode():
        got = gemv.linear(x, w)
    assert got.shape == (2, 1, 48)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_calls_up_to_the_native_row_count_take_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    rows_seen: list[int] = []
    real = gemv.linear

    def counting(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows_seen.append(x.numel() // x.shape[-1])
        return real(x, w)

    monkeypatch.setattr(gemv, "linear", counting)
    w = torch.randn(32, 16)
    with torch.inference_mode():
        for rows in (1, 2, 3, 16):
            linear(torch.randn(rows, 16), w, None, native_max_rows=2)
        linear(torch.randn(2, 16), w.t().contiguous().t(), None, native_max_rows=2)  # a transposed weight: BLAS
        linear(torch.randn(2, 16, dtype=torch.bfloat16), w.bfloat16(), None, native_max_rows=2)  # bf16: BLAS
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(torch.randn(2, 16), w, None, native_max_rows=2)  # autocast: F.linear in bf16
    linear(torch.randn(2, 16), w, None, native_max_rows=2)  # gradients enabled: BLAS
    assert rows_seen == [1, 2]


def test_without_a_compiler_the_kernel_is_unavailable_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LLAMAGEN_GATEWAY_NATIVE_CACHE", str(tmp_path / "cache"))
    gemv.library.cache_clear()
    try:
        assert not gemv.available()
        assert "could not build or load gemv.c" in caplog.text
        with pytest.raises(RuntimeError, match="not available on this machine"):
            gemv.linear(torch.randn(2, 4), torch.randn(3, 4))
    finally:
        gemv.library.cache_clear()


@needs_kernel
def test_the_library_is_built_once_into_the_cache_and_loaded_from_it(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMAGEN_GATEWAY_NATIVE_CACHE", str(tmp_path))
    gemv.library.cache_clear()
    try:
        assert gemv.available()
        (built,) = tmp_path.glob("gemv-*.so")
        stamp = built.stat().st_mtime_ns
        gemv.library.cache_clear()
        assert gemv.available() and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
        assert sorted(p.name for p in tmp_path.iterdir()) == [built.name]  # no temporary left behind
        damaged = tmp_path / "damaged"
        damaged.write_bytes(b"not a shared library")
        damaged.replace(built)  # a new file: the library this process loaded keeps its own pages
        check = "from generator.llamagen import gemv; print(gemv.available())"  # a process that never loaded it
        run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "LLAMAGEN_GATEWAY_NATIVE_CACHE": str(tmp_path)}, check=True)
        assert run.stdout.strip() == "True" and built.read_bytes()[:4] == b"\x7fELF"  # built afresh
    finally:
        gemv.library.cache_clear()


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count_and_the_calling_thread_uses_torchs() -> None:
    import threading

    x, w = torch.randn(2, 768), torch.randn(512, 768)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.linear(x, w)
        torch.set_num_threads(2)
        two = gemv.linear(x, w)
        other: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: other.append(gemv.linear(x, w)))  # its own OpenMP defaults
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, other[0])  # each output is summed by one thread


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("count", [0, 1, 2, 63, 64, 65, 1000, 4099])  # below, at and past one thread's vector sums
def test_the_bandwidth_reader_sums_every_element_once_for_any_length_and_team(count: int, threads: int) -> None:
    values = torch.arange(1, count + 1, dtype=torch.float32)  # exact in float32: the sum is below 2**24
    library = gemv.library()
    assert library is not None
    assert library.llamagen_read_sum(values.data_ptr(), count, threads) == count * (count + 1) // 2
