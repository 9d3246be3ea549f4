"""Our own CPU decode kernels (gemv.c), built with the machine's C compiler on first use: a few-row float32
matmul, and a whole decode step (every layer and the output head in one call; see `decode_step`).

Batch-1 decode under CFG multiplies 2 rows by every weight, so a step costs the time to stream the weights
from memory. On the 2-core AMD EPYC (AVX-512) the BLAS paths read GPT-B's 390 MB of linear weights at
5-6 GB/s (MKL, F.linear) and 13-21 GB/s (oneDNN packed), where a plain read of memory reaches 30-53 GB/s;
gemv.c reads each weight row once for all the rows and reached 22-35 GB/s there, timed in the same runs
(2026-12-03; that machine's bandwidth moved by 1.5x from run to run). On a 2-core Intel Xeon (AVX-512),
F.linear read them at 18-23 GB/s and gemv.c at 26-27 GB/s, as fast as a plain read of the same matrices
(2026-12-03, later). layout.py times it against the BLAS layouts and keeps whichever is faster for the
model at hand.

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
from dataclasses import dataclass, field
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


class StepArgs(ctypes.Structure):
    """gemv.c's step_args: the shapes of one decode step."""

    _fields_ = [(name, ctypes.c_long) for name in ("rows", "dim", "n_head", "n_kv_head", "head_dim", "hidden",
                                                    "vocab", "n_layer", "max_seq", "pos", "key_stride")]
    _fields_ += [("eps", ctypes.c_float), ("threads", ctypes.c_int)]


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
    lib.llamagen_decode_step.argtypes = [ctypes.POINTER(StepArgs)] + [ctypes.c_void_p] * 8
    lib.llamagen_decode_step.restype = ctypes.c_int
    lib.llamagen_probs.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_float,
                                   ctypes.c_float, ctypes.c_long, ctypes.c_void_p]
    lib.llamagen_probs.restype = ctypes.c_int
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


# One layer's tensors as llamagen_decode_step reads them (its TENSORS_PER_LAYER order).
STEP_TENSORS = ("attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2", "k_cache", "v_cache")


@dataclass
class StepModel:
    """What a whole decode step reads: per layer the STEP_TENSORS, then the final norm and the output head.
    Every tensor is CPU float32 and contiguous (the caches [max_batch, n_kv_head, max_seq, head_dim])."""

    layers: list[tuple[Tensor, ...]]
    norm: Tensor
    output: Tensor
    n_head: int
    n_kv_head: int
    eps: float
    # Derived once in __post_init__: the shapes every step passes to the kernel, and the address table.
    vocab: int = field(init=False)
    dim: int = field(init=False)
    head_dim: int = field(init=False)
    hidden: int = field(init=False)
    cache_rows: int = field(init=False)  # the caches' max_batch
    max_seq: int = field(init=False)
    table: Tensor = field(init=False)  # every layer's STEP_TENSORS addresses, as the kernel reads them

    def __post_init__(self) -> None:
        """Refuse tensors the kernel would misread: it trusts every shape it is given."""
        self.vocab, self.dim = self.output.shape
        dim = self.dim
        if self.norm.shape != (dim,) or dim % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"inconsistent step shapes: dim {dim}, {self.n_head} heads, {self.n_kv_head} kv heads")
        first = dict(zip(STEP_TENSORS, self.layers[0], strict=True))
        self.head_dim, self.hidden = dim // self.n_head, first["w13"].shape[0] // 2
        self.cache_rows, self.max_seq = first["k_cache"].shape[0], first["k_cache"].shape[2]
        expected = {"attention_norm": (dim,), "wqkv": ((self.n_head + 2 * self.n_kv_head) * self.head_dim, dim),
                    "wo": (dim, dim), "ffn_norm": (dim,), "w13": (2 * self.hidden, dim), "w2": (dim, self.hidden),
                    "k_cache": (self.cache_rows, self.n_kv_head, self.max_seq, self.head_dim)}
        expected["v_cache"] = expected["k_cache"]
        for layer in self.layers:
            for name, tensor in zip(STEP_TENSORS, layer, strict=True):
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(f"{name} is {tuple(tensor.shape)}, the step needs {expected[name]}")
        for tensor in [t for layer in self.layers for t in layer] + [self.norm, self.output]:
            if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError("a decode step runs on contiguous CPU float32 tensors only")
        self.table = torch.tensor([t.data_ptr() for layer in self.layers for t in layer], dtype=torch.int64)


def decode_step(model: StepModel, x: Tensor, pos: int, cos: Tensor, sin: Tensor, key_ok: Tensor | None) -> Tensor:
    """Logits [rows, vocab] of one decode step at `pos` from embeddings x [rows, dim], in one gemv.c call.

    Writes the step's keys and values into the caches at `pos` and attends over positions 0..pos, minus
    those key_ok [rows, pos + 1] (bool) marks False. cos, sin: the rotary rows of `pos` (rope.rotary_tables).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native gemv kernel is not available on this machine")
    rows, dim = x.shape
    if dim != model.dim or rows > model.cache_rows or not 0 <= pos < model.max_seq:
        raise ValueError(f"{rows} rows of {dim} at position {pos} do not fit caches of {model.cache_rows} rows "
                         f"and {model.max_seq} positions for width {model.dim}")
    if cos.shape != (model.head_dim,) or sin.shape != cos.shape or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"the rotary rows must be contiguous [{model.head_dim}], got {tuple(cos.shape)}")
    if key_ok is not None and (key_ok.shape[0] != rows or key_ok.shape[1] < pos + 1):
        raise ValueError(f"key_ok is {tuple(key_ok.shape)}, the step needs [{rows}, >= {pos + 1}]")
    args = StepArgs(rows=rows, dim=dim, n_head=model.n_head, n_kv_head=model.n_kv_head, head_dim=model.head_dim,
                    hidden=model.hidden, vocab=model.vocab, n_layer=len(model.layers), max_seq=model.max_seq,
                    pos=pos, eps=model.eps, threads=torch.get_num_threads())
    if key_ok is not None:
        key_ok = key_ok.to(torch.uint8).contiguous()
        args.key_stride = key_ok.shape[1]
    hidden = x.contiguous().clone()  # the kernel overwrites it with the last hidden state
    logits = torch.empty(rows, args.vocab)
    failed = lib.llamagen_decode_step(ctypes.byref(args), hidden.data_ptr(), logits.data_ptr(), model.table.data_ptr(),
                                      model.norm.data_ptr(), model.output.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                      None if key_ok is None else key_ok.data_ptr())
    if failed:
        raise MemoryError("gemv.c could not allocate a decode step's scratch memory")
    return logits


def probs(logits: Tensor, combine: bool, cfg_scale: float, temperature: float, top_k: int) -> Tensor | None:
    """Sampling probabilities [rows, vocab] of CPU float32 logits, in one gemv.c pass (see llamagen_probs).

    combine: logits are [cond; uncond] rows, guided as uncond + (cond - uncond) * cfg_scale; else each row is
    taken as it is. temperature: floored already; top_k 0: off. Every row returned is a distribution (finite,
    non-negative, with mass). None where the kernel is not built or a row would not be one (a NaN logit, a
    +inf one, all -inf): sampling.py's tensor operations then run, and its draw reports the fault.
    """
    lib = library()
    if lib is None:
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    rows = rows // 2 if combine else rows
    out = torch.empty(rows, vocab)
    failed = lib.llamagen_probs(logits.data_ptr(), rows, vocab, int(combine), cfg_scale, temperature, top_k,
                                out.data_ptr())
    return None if failed else out


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
