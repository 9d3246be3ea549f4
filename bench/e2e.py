"""End-to-end throughput and latency of the embedded gateway with the demo model.

Concurrency 1, 4 and 16 clients, with dynamic batching (batch 8) and without (batch 1); the share of each
stage of the end-to-end latency. Targets: governance stages (prompt screening, output screening, signing,
audit) <= 5% of end-to-end latency; batching >= 3x throughput at concurrency 16 over concurrency 1.

    .venv/bin/python bench/e2e.py [--jobs 32] [--model demo-shapes-t2i]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

from gateway.main import create_app  # noqa: E402
from gateway.state import build_state, close_state  # noqa: E402
from tests.conftest import Gateway, make_settings  # noqa: E402

PROMPTS = ["a small red star above a large blue circle on a white background",
           "a green square on a black background",
           "a large yellow triangle left of a small purple circle on a grey background",
           "a blue star on a white background"]
STAGES = ("prompt_screening_s", "queue_s", "sampling_s", "output_screening_s", "signing_s", "audit_s")
GOVERNANCE = ("prompt_screening_s", "output_screening_s", "signing_s", "audit_s")


def run(model: str, jobs: int, concurrency: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp) / "var", worker_batch_size=batch,
                                 worker_batch_wait_ms=30 if batch > 1 else 0,
                                 rate_limit_per_minute=0, team_quota_per_day=0)
        state = build_state(settings)
        with TestClient(create_app(settings, state=state)) as client:
            gw = Gateway(client, state)
            key = gw.key("creator", team="bench")
            warm = client.post("/v1/generations", headers=gw.auth(key), json=_body(model, 0)).json()
            gw.wait(warm["id"], key)

            def one(i: int) -> tuple[float, dict]:
                t0 = time.perf_counter()
                job = client.post("/v1/generations", headers=gw.auth(key), json=_body(model, i)).json()
                done = gw.wait(job["id"], key, timeout=600)
                assert done["status"] == "completed", done
                return time.perf_counter() - t0, done["timings"]

            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(one, range(1, jobs + 1)))
            wall = time.perf_counter() - t0
        close_state(state)
    latencies = [r[0] for r in results]
    shares = {s: statistics.mean(r[1].get(s, 0.0) for r in results) for s in STAGES}
    return {"throughput": jobs / wall, "p50": statistics.median(latencies), "mean": statistics.mean(latencies),
            **shares}


def _body(model: str, i: int) -> dict:
    if model.endswith("c2i"):
        return {"model": model, "class_id": i % 8, "params": {"seed": i}}
    return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "params": {"seed": i}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--model", default="demo-shapes-t2i")
    args = parser.parse_args()
    rows = {}
    for batch in (1, 8):
        for conc in (1, 4, 16):
            jobs = max(args.jobs // (4 if conc == 1 else 1), 4)
            r = rows[(batch, conc)] = run(args.model, jobs, conc, batch)
            gov = sum(r[s] for s in GOVERNANCE)
            print(f"batch {batch} concurrency {conc:2}: {r['throughput']:.2f} images/s, p50 {r['p50'] * 1000:.0f} ms, "
                  f"governance {gov * 1000:.1f} ms = {100 * gov / r['mean']:.1f}% of end-to-end", flush=True)
            print("    stages (mean ms): " + ", ".join(f"{s[:-2]} {r[s] * 1000:.1f}" for s in STAGES), flush=True)
    ratio = rows[(8, 16)]["throughput"] / rows[(1, 1)]["throughput"]
    gov_share = max(sum(r[s] for s in GOVERNANCE) / r["mean"] for r in rows.values())
    print(f"\nbatching: concurrency 16 (batch 8) / concurrency 1 throughput = {ratio:.2f}x (target >= 3x)")
    print(f"governance share of end-to-end latency, worst case: {100 * gov_share:.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
