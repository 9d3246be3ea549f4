"""A few-row float32 matmul of our own (gemv.c) for CPU decode, built with the machine's C compiler on first use.

Batch-1 decode under CFG multiplies 2 rows by every weight, so a step costs the time to stream the weights
from memory. On the 2-core AMD EPYC (AVX-512) the BLAS paths read GPT-B's 390 MB of linear weights at
5-6 GB/s (MKL, F.linear) and 13-21 GB/s (oneDNN packed), where a plain read of memory reaches 30-53 GB/s;
gemv.c reads each weight row once for all the rows and reached 22-35 GB/s there, timed in the same runs
(2026-12-03; this machine's bandwidth moved by 1.5x from run to run). layout.py times it against the BLAS
layouts and keeps whichever is faster for the model at hand.

The library is compiled with `cc -O3 -march=native -fopenmp` into a per-user cache, keyed by the source,
the compiler, its flags and this CPU's feature flags, and loaded with ctypes (which lets go of the GIL
during a call). Where there is no C compiler, or the build fails, `available()` is False and decode uses
the BLAS layouts as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    """Where built libraries are kept: $LLAMAGEN_GATEWAY_NATIVE_CACHE, else the user's cache directory."""
    configured = os.environ.get("LLAMAGEN_GATEWAY_NATIVE_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamagen-gateway" / "native"


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), so a cache shared across machines never serves another CPU's build."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)  # atomic: processes building at once each install a whole library


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built or loaded (the reason is logged once)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: CPU decode uses the BLAS layouts only")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    path = cache_dir() / f"gemv-{key}.so"
    try:
        if not path.is_file():
            _build(compiler, path)
        try:
            lib = ctypes.CDLL(str(path))  # after torch: the OpenMP runtime it links is torch's, already loaded
        except OSError:  # a cached library this system cannot load (damaged, or another libc): build afresh
            _build(compiler, path)
            lib = ctypes.CDLL(str(path))
    except subprocess.CalledProcessError as exc:
        log.warning("could not build %s (CPU decode uses the BLAS layouts): %s", SOURCE.name, exc.stderr.strip())
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not build or load %s (CPU decode uses the BLAS layouts): %s", SOURCE.name, exc)
        return None
    lib.llamagen_gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                  ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.llamagen_gemv.restype = None
    lib.llamagen_read_sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.llamagen_read_sum.restype = ctypes.c_float
    return lib


def available() -> bool:
    return library() is not None


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` can run these operands: CPU float32, a row-major weight, no gradient to record, and
    nothing that would see the call differently (a trace or compile cannot record it; autocast would have
    run F.linear in bf16)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for CPU float32 x [..., in] and a row-major weight [out, in] (see `usable`)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native gemv kernel is not available on this machine")
    n_out, features = weight.shape
    if x.shape[-1] != features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {features}")
    rows = x if x.is_contiguous() else x.contiguous()
    count = rows.numel() // features
    out = torch.empty(*x.shape[:-1], n_out)
    lib.llamagen_gemv(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), count, n_out, features,
                      torch.get_num_threads())
    return out


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float | None:
    """Best observed read-only bandwidth (bytes/s) of a sum in gemv.c's threads; None without the library."""
    lib = library()
    if lib is None:
        return None
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        lib.llamagen_read_sum(src.data_ptr(), src.numel(), torch.get_num_threads())
        best = min(best, time.perf_counter() - started)
    return nbytes / best
