# CPU weight packing for the inference matmuls of generator/llamagen/model.py. The packed layout is
# oneDNN's (the library PyTorch already uses for bf16 CPU linears); PyTorch exposes it as
# torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise, the ops its own CPU freezing passes emit.
"""oneDNN-packed copies of CPU linear weights, used by inference matmuls while they match their source."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from generator.llamagen import gemv

# Rows per matmul the packing is tuned for: batch-1 decode under CFG runs 2 rows (cond and null).
# Any row count works with any packing, and a row's result does not depend on the other rows.
DECODE_ROWS_HINT = 2
# Smallest weight (elements) worth packing. A packed matmul costs about 35 us per call before any work on the
# 2-core AMD EPYC, so small weights run faster plain (1 thread, 1 row: 192x192 7 us against 33, 1024x192 28 us
# against 51; at 2 rows 1024x192 is even, at 48 us). From about 0.6M elements (768x768, GPT-B's smallest)
# packing won there at 2+ rows, 1.3-3x on the larger ones; on a Xeon it wins only from more rows, so
# layout.py times it. The demo models' weights all fall below the line.
PACK_MIN_ELEMENTS = 1 << 19
# float32 only: oneDNN's bf16 packing needs AVX512-BF16 or AVX-NE-CONVERT, and bf16 linears already run
# through oneDNN with its own per-call weight handling.
PACKED_DTYPES = (torch.float32,)


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN and the packed-linear ops."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


@dataclass(frozen=True)
class PackedWeight:
    """A packed copy of `source` [out, in]; stale once the source is replaced or a watched tensor changes."""

    packed: Tensor  # opaque oneDNN tensor, shape [out, in]
    source: Tensor  # keeps the packed storage alive, so its address cannot be reused by another tensor
    watched: tuple[Tensor, ...]  # the parameters that own the values (in-place updates bump _version)
    versions: tuple[int, ...]
    min_rows: int = 1  # calls with fewer rows run the plain weight (faster there on some CPUs)

    def matches(self, weight: Tensor) -> bool:
        return weight.data_ptr() == self.source.data_ptr() and all(
            t._version == v for t, v in zip(self.watched, self.versions, strict=True)
        )


def pack(
    weight: Tensor,
    rows_hint: int = DECODE_ROWS_HINT,
    watch: Sequence[Tensor] = (),
    min_elements: int = PACK_MIN_ELEMENTS,
    min_rows: int = 1,
) -> PackedWeight | None:
    """Packed copy of a CPU float32 weight [out, in], or None where packing does not apply or does not pay.

    watch: the parameters whose in-place updates must invalidate the copy when they are not `weight`
    itself (a fused matrix whose halves are parameters set through `.data` keeps no shared version).
    min_elements: smaller weights stay plain (see PACK_MIN_ELEMENTS).
    min_rows: matmuls of fewer rows (x's leading dimensions flattened) use the plain weight.
    """
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or not packing_available():
        return None
    if weight.numel() < min_elements:
        return None
    watched = tuple(watch) or (weight,)
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)
    return PackedWeight(
        packed=packed,
        source=weight.detach(),
        watched=watched,
        versions=tuple(t._version for t in watched),
        min_rows=min_rows,
    )


def linear(x: Tensor, weight: Tensor, packed: PackedWeight | None, native_max_rows: int = 0) -> Tensor:
    """x @ weight.T: through gemv.c for calls of at most `native_max_rows` rows, else through the packed copy
    when it is current, no gradient is needed and x has enough rows, else F.linear."""
    if native_max_rows and x.numel() <= native_max_rows * x.shape[-1] and gemv.usable(x, weight):
        return gemv.linear(x, weight)
    if (
        packed is None
        or torch.compiler.is_compiling()
        or torch.is_grad_enabled()
        or x.dtype != weight.dtype
        or x.numel() < packed.min_rows * x.shape[-1]
        or not packed.matches(weight)
    ):
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed.packed, None, "none", [], "")
