"""Type checks for the configuration dataclasses (ModelArgs, VQArgs).

They are built from model-card YAML and checkpoint records, where `dim: abc` would otherwise fail deep in
`__post_init__` or in torch with a message that does not name the field.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}


def check_field_types(config: Any) -> None:
    """Raise ValueError naming the first int, float, bool or tuple-of-int field holding another type."""
    for f in fields(config):
        if not f.init:
            continue
        annotation = str(f.type)  # a string: the dataclasses use `from __future__ import annotations`
        kind = annotation.removesuffix(" | None")
        value = getattr(config, f.name)
        if value is None and kind != annotation:
            continue
        if kind == "tuple[int, ...]":
            ok = isinstance(value, tuple) and all(type(v) is int for v in value)
        elif kind in _KINDS:  # bool is an int to Python, but never a size or a rate here
            ok = isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))
        else:
            continue
        if not ok:
            raise ValueError(f"{f.name} must be {annotation}, got {value!r}")
