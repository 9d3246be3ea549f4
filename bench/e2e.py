"""End-to-end throughput and latency of the embedded gateway with the demo model.

Concurrency 1, 4 and 16 clients, with dynamic batching (batch 8) and without (batch 1); the share of each
stage of the end-to-end latency. Targets: governance stages (prompt screening, output screening, signing,
audit) <= 5% of end-to-end latency; batching >= 3x throughput at concurrency 16 over concurrency 1.
Before it is measured, each configuration runs 2 x concurrency jobs at its own concurrency, unmeasured: the
first batched runs of a process pay once for their shapes (allocations, traced graphs), which is not
throughput. Then `--jobs` jobs are measured (a quarter as many at concurrency 1).
Each configuration also prints the CPU time the gateway's processes (gateway + sampler) spent per image: at
concurrency 16 throughput is bounded by cores / that figure, whichever process the work runs in.

Clients wait for their jobs with the long-poll of `GET /v1/generations/{id}?wait=S`; `--poll 0.1` makes
them poll every 0.1 s instead (how this bench measured before the gateway offered the wait).

`--readers N` adds N clients that list the team's latest 200 generations in a loop while the jobs run:
Python-heavy traffic in the gateway's process, next to its screening, signing and audit work.

`--official CARD` serves an official model card instead (class-to-image only: `llamagen-c2i-b-256` is GPT-B with
VQ-16) with random weights of its architecture, written in the official checkpoint format to a temporary
models folder beside the demo models (nothing can be downloaded here): the same stages with a production-sized
model, whose sampling takes seconds where the demo model's takes tens of milliseconds.

`--compare DIR` serves each configuration from another checkout too (e.g. `git archive` of an older commit,
with its `models` linked to this one's), alternating the two `--rounds` times, and prints new/old ratios:
on shared, noisy machines only same-run ratios mean anything. Without `--compare`, `--rounds N` runs all the
configurations N times over, and prints the batching ratio of each round (its concurrency-16 run over its
concurrency-1 run, minutes apart rather than the whole run apart) and their median.

    .venv/bin/python bench/e2e.py [--jobs 96] [--model demo-shapes-t2i | --official llamagen-c2i-b-256] [--poll 0]
                                  [--configs 1x1,8x16] [--readers 2] [--compare /tmp/old --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

PROMPTS = ["a small red star above a large blue circle on a white background",
           "a green square on a black background",
           "a large yellow triangle left of a small purple circle on a grey background",
           "a blue star on a white background"]
STAGES = ("prompt_screening_s", "queue_s", "sampling_s", "decode_s", "output_screening_s", "signing_s", "store_s",
          "audit_s")
GOVERNANCE = ("prompt_screening_s", "output_screening_s", "signing_s", "audit_s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(model: str, jobs: int, concurrency: int, batch: int, poll_s: float = 0.0,
        repo: Path = REPO, readers: int = 0, models_dir: Path | None = None) -> dict[str, float]:
    """One configuration against a gateway served from `repo` in its own process (clients long-poll, or poll
    every `poll_s` seconds), with `readers` clients listing generations meanwhile; `models_dir`: the models
    folder to serve (default: the checkout's own)."""
    task = _task(models_dir or repo / "models", model)
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {**os.environ, "LLAMAGEN_GATEWAY_DATA_DIR": f"{tmp}/var", "LLAMAGEN_GATEWAY_ENV": "test",
               "LLAMAGEN_GATEWAY_SESSION_SECRET": "bench", "LLAMAGEN_GATEWAY_WORKER_BATCH_SIZE": str(batch),
               "LLAMAGEN_GATEWAY_WORKER_BATCH_WAIT_MS": "30" if batch > 1 else "0",
               "LLAMAGEN_GATEWAY_RATE_LIMIT_PER_MINUTE": "0", "LLAMAGEN_GATEWAY_TEAM_QUOTA_PER_DAY": "0",
               "LLAMAGEN_GATEWAY_LOG_JSON": "false", "LLAMAGEN_GATEWAY_DEVICE": "cpu"}
        if models_dir is not None:
            env["LLAMAGEN_GATEWAY_MODELS_DIR"] = str(models_dir)
        cli = [sys.executable, "-m", "gateway.cli"]
        subprocess.run([*cli, "migrate"], env=env, cwd=repo, check=True, capture_output=True)
        key = subprocess.run([*cli, "keys", "create", "--role", "creator", "--team", "bench"], env=env, cwd=repo,
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        server = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, cwd=repo,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
                _wait_ready(client)

                def one(i: int) -> tuple[float, dict]:
                    t0 = time.perf_counter()
                    job = client.post("/v1/generations", json=_body(model, task, i)).json()
                    params = {"wait": 0 if poll_s else 30}
                    while True:
                        done = client.get(f"/v1/generations/{job['id']}", params=params).json()
                        if done["status"] not in ("queued", "running"):
                            break
                        time.sleep(poll_s)
                    assert done["status"] == "completed", done
                    return time.perf_counter() - t0, done["timings"]

                one(0)  # warm: models and classifiers loaded
                with ThreadPoolExecutor(concurrency) as pool:  # and the batch shapes of this concurrency run once
                    list(pool.map(one, range(jobs + 1, jobs + 1 + 2 * concurrency)))
                done_event = threading.Event()
                listed = [0] * readers
                failures: list[BaseException] = []

                def read(i: int) -> None:
                    try:
                        with httpx.Client(base_url=base, headers=client.headers, timeout=30) as own:
                            while not done_event.is_set():
                                own.get("/v1/generations", params={"limit": 200}).raise_for_status()
                                listed[i] += 1
                    except BaseException as exc:  # reported after the run: it would under-report the load
                        failures.append(exc)

                reader_threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
                cpu0, worker0 = _process_tree_cpu_s(server.pid), _worker_metrics(client)
                t0 = time.perf_counter()
                for thread in reader_threads:
                    thread.start()
                try:
                    with ThreadPoolExecutor(concurrency) as pool:
                        results = list(pool.map(one, range(1, jobs + 1)))
                    wall = time.perf_counter() - t0
                finally:
                    done_event.set()
                    for thread in reader_threads:
                        thread.join()
                if failures:
                    raise RuntimeError(f"a reader failed during the run: {failures[0]!r}") from failures[0]
                cpu1, worker1 = _process_tree_cpu_s(server.pid), _worker_metrics(client)
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies = [r[0] for r in results]
    shares = {s: statistics.mean(r[1].get(s, 0.0) for r in results) for s in STAGES}
    # A job row records its audit transactions' time up to their commits (it cannot hold its own commit's), so
    # the request's commit shows in its queue time and the release's in no stage. The audit stage is taken
    # from the metrics instead, which time both until the commit was durable, and the request's commit wait
    # is taken out of the queue time (a gateway from before those metrics keeps the rows' figures).
    delta = {name: worker1[name] - worker0[name] for name in WORKER_METRICS}
    requests, releases = delta[_stage_metric(REQUEST_AUDIT, "count")], delta[_stage_metric(RELEASE_AUDIT, "count")]
    if requests and releases:
        request_audit = delta[_stage_metric(REQUEST_AUDIT, "sum")] / requests
        request_commit = request_audit - statistics.mean(r[1].get("request_audit_s", 0.0) for r in results)
        shares["queue_s"] = max(shares["queue_s"] - request_commit, 0.0)
        shares["audit_s"] = request_audit + delta[_stage_metric(RELEASE_AUDIT, "sum")] / releases
    cpu = {} if cpu0 is None or cpu1 is None else {"cpu_per_image": (cpu1 - cpu0) / jobs}
    runs = worker1["worker_batch_size_count"] - worker0["worker_batch_size_count"]
    worker = {"batch_mean": (worker1["worker_batch_size_sum"] - worker0["worker_batch_size_sum"]) / max(runs, 1),
              "sampler_busy": (worker1["worker_busy_seconds_total"] - worker0["worker_busy_seconds_total"]) / wall}
    return {"throughput": jobs / wall, "p50": statistics.median(latencies),
            "p95": statistics.quantiles(latencies, n=20, method="inclusive")[-1], "mean": statistics.mean(latencies),
            "lists_per_s": sum(listed) / wall, **shares, **cpu, **worker}


def _process_tree_cpu_s(root: int) -> float | None:
    """CPU seconds (user + system) used so far by process `root` and its live descendants (the sampler
    process), from /proc; None where there is no /proc."""
    proc = Path("/proc")
    if not (proc / str(root) / "stat").exists():
        return None
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


REQUEST_AUDIT, RELEASE_AUDIT = ("gateway_stage_seconds", "request_audit"), ("worker_stage_seconds", "audit")


def _stage_metric(metric: tuple[str, str], part: str) -> str:
    name, stage = metric
    return f'{name}_{part}{{stage="{stage}"}}'


WORKER_METRICS = ("worker_batch_size_sum", "worker_batch_size_count", "worker_busy_seconds_total",
                  *(_stage_metric(m, part) for m in (REQUEST_AUDIT, RELEASE_AUDIT) for part in ("sum", "count")))


def _worker_metrics(client: httpx.Client) -> dict[str, float]:
    """Counters from /metrics: jobs per sampling run, seconds spent sampling and decoding, and the audit
    stages until their commits were durable."""
    values = dict.fromkeys(WORKER_METRICS, 0.0)
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def _wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the gateway did not become ready")


def _task(models_dir: Path, model: str) -> str:
    from generator.registry import Registry

    return Registry(models_dir).get(model).task


def official_models(card_name: str, root: Path) -> Path:
    """A models folder under `root`: the checkout's demo models, and the official card `card_name` serving
    random weights of its architecture, written in the official checkpoint format and pinned on the card."""
    import torch
    import yaml

    from generator.llamagen import ModelArgs, VQArgs, build_gpt, build_vq, save_checkpoint, sha256_file

    source = REPO / "models" / "official" / f"{card_name}.yaml"
    if not source.is_file():
        raise SystemExit(f"no official card {source}")
    card = yaml.safe_load(source.read_text())
    if card["task"] != "c2i":
        raise SystemExit(f"{source}: only class-to-image cards can be served without their text encoder")
    models = root / "models"
    models.mkdir()
    for entry in (REPO / "models").iterdir():
        if entry.name != "official":
            (models / entry.name).symlink_to(entry)
    arch = card["architecture"]
    torch.manual_seed(0)
    gpt = build_gpt(ModelArgs.from_name(arch["gpt"], task="c2i", image_size=arch["image_size"],
                                        downsample=VQArgs.from_name(arch["vq"]).downsample), device="cpu")
    with torch.no_grad():  # the official zero-initialised head would make every token equally likely
        torch.nn.init.normal_(gpt.output.weight, std=0.02)
    for key, module in (("gpt", gpt), ("vq", build_vq(VQArgs.from_name(arch["vq"]), device="cpu"))):
        path = models / card["checkpoints"][key]["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(module, path)
        card["checkpoints"][key]["sha256"] = sha256_file(path)
    (models / "official" / source.name).write_text(yaml.safe_dump(card, sort_keys=False))
    return models


def _body(model: str, task: str, i: int) -> dict:
    if task == "c2i":
        return {"model": model, "class_id": i % 8, "params": {"seed": i}}
    return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "params": {"seed": i}}


def _governance(r: dict[str, float]) -> float:
    return sum(r[s] for s in GOVERNANCE)


def _line(label: str, r: dict[str, float]) -> str:
    gov = _governance(r)
    cpu = ""
    if "cpu_per_image" in r:  # the gateway's processes cannot serve more than cores / cpu-per-image
        ceiling = (os.cpu_count() or 1) / r["cpu_per_image"]
        reached = 100 * r["throughput"] / ceiling
        cpu = (f"\n    cpu {r['cpu_per_image'] * 1000:.0f} ms per image (gateway + sampler processes"
               f"{', serving the readers too' if r['lists_per_s'] else ''}): "
               f"at most {ceiling:.1f} images/s on {os.cpu_count()} cores, {reached:.0f}% reached")
    readers = ""
    if r["lists_per_s"]:
        readers = f"\n    readers listed 200 generations {r['lists_per_s']:.1f} times/s meanwhile"
    return (f"{label}: {r['throughput']:.2f} images/s, p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms, "
            f"governance {gov * 1000:.1f} ms "
            f"= {100 * gov / r['mean']:.1f}% of end-to-end\n"
            "    stages (mean ms): " + ", ".join(f"{s[:-2]} {r[s] * 1000:.1f}" for s in STAGES) + "\n"
            f"    {r['batch_mean']:.1f} jobs per sampling run; the sampler was busy "
            f"{100 * r['sampler_busy']:.0f}% of the time" + cpu + readers)


def _mean(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.mean(r[k] for r in results) for k in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=96,
                        help="jobs per configuration at concurrency > 1 (a quarter of them at concurrency 1)")
    parser.add_argument("--model", default="demo-shapes-t2i")
    parser.add_argument("--official", metavar="CARD",
                        help="serve this official c2i card with random weights instead of --model (see above)")
    parser.add_argument("--poll", type=float, default=0.0, help="poll every S seconds instead of long-polling")
    parser.add_argument("--configs", default="1x1,1x4,1x16,8x1,8x4,8x16",
                        help="BATCHxCONCURRENCY pairs to run, comma-separated")
    parser.add_argument("--readers", type=int, default=0,
                        help="clients listing 200 generations in a loop while the jobs run")
    parser.add_argument("--compare", type=Path, help="another checkout to serve each configuration from too")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare: alternations per configuration; without: passes over all of them")
    args = parser.parse_args()
    configs = [tuple(int(n) for n in pair.split("x")) for pair in args.configs.split(",")]
    trees = {"new": REPO} if args.compare is None else {"old": args.compare.resolve(), "new": REPO}
    rows: dict[tuple[str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = None
        if args.official:
            started = time.perf_counter()
            models_dir, args.model = official_models(args.official, Path(tmp)), args.official
            print(f"{args.official}: random weights written in {time.perf_counter() - started:.1f} s", flush=True)
        ratios: list[float] = []
        if args.compare or args.rounds == 1:
            _run_configs(args, configs, trees, rows, models_dir)
        else:
            ratios = _run_rounds(args, configs, rows, models_dir)
    _summary(args.model, trees, rows, ratios)


def _jobs(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.jobs // (4 if concurrency == 1 else 1), 4)


def _run_configs(args: argparse.Namespace, configs: list[tuple[int, ...]], trees: dict[str, Path],
                 rows: dict[tuple[str, int, int], dict[str, float]], models_dir: Path | None) -> None:
    for batch, conc in configs:
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.rounds if args.compare else 1):
            for name, tree in trees.items():
                results[name].append(run(args.model, _jobs(args, conc), conc, batch, args.poll, tree, args.readers,
                                         models_dir))
        for name in trees:
            r = rows[(name, batch, conc)] = _mean(results[name])
            label = f"batch {batch} concurrency {conc:2}" + (f" [{name}]" if args.compare else "")
            print(_line(label, r), flush=True)
        if args.compare:
            old, new = rows[("old", batch, conc)], rows[("new", batch, conc)]
            print(f"    new/old: throughput {new['throughput'] / old['throughput']:.2f}x, "
                  f"p50 {new['p50'] / old['p50']:.2f}x, governance ms {_governance(new) / _governance(old):.2f}x",
                  flush=True)


def _run_rounds(args: argparse.Namespace, configs: list[tuple[int, ...]],
                rows: dict[tuple[str, int, int], dict[str, float]], models_dir: Path | None) -> list[float]:
    """Every configuration once per round -> each round's batching ratio (8x16 over 1x1, when both run): the
    machine's speed drifts between runs minutes apart less than across a whole multi-round run."""
    results: dict[tuple[int, ...], list[dict[str, float]]] = {config: [] for config in configs}
    ratios = []
    for number in range(1, args.rounds + 1):
        for batch, conc in configs:
            results[(batch, conc)].append(run(args.model, _jobs(args, conc), conc, batch, args.poll, REPO,
                                              args.readers, models_dir))
        if (1, 1) in results and (8, 16) in results:
            ratios.append(results[(8, 16)][-1]["throughput"] / results[(1, 1)][-1]["throughput"])
            print(f"round {number}: batching {ratios[-1]:.2f}x", flush=True)
    for (batch, conc), runs in results.items():
        rows[("new", batch, conc)] = _mean(runs)
        print(_line(f"batch {batch} concurrency {conc:2} (mean of {len(runs)} rounds)", rows[("new", batch, conc)]),
              flush=True)
    return ratios


def _summary(model: str, trees: dict[str, Path], rows: dict[tuple[str, int, int], dict[str, float]],
             ratios: list[float]) -> None:
    for name in trees:
        if (name, 8, 16) in rows and (name, 1, 1) in rows:
            ratio = rows[(name, 8, 16)]["throughput"] / rows[(name, 1, 1)]["throughput"]
            print(f"\n[{name}] {model} batching: concurrency 16 (batch 8) / concurrency 1 throughput = "
                  f"{ratio:.2f}x (target >= 3x with the demo model)")
            if ratios:
                print(f"[{name}] per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
                      f"median {statistics.median(ratios):.2f}x")
        shares = [_governance(r) / r["mean"] for key, r in rows.items() if key[0] == name]
        print(f"[{name}] {model} governance share of end-to-end latency, worst case: {100 * max(shares):.1f}% "
              "(target <= 5% with the demo model)")


if __name__ == "__main__":
    main()
