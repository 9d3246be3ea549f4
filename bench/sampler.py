"""LlamaGen sampler and VQ decode throughput on random weights, against the official eager sampler.

Usage: python -m bench.sampler [--threads 2] [--tokens 256] [--batches 1 8] [--dtypes fp32 bf16]

Prints tokens/s and ms/step for GPT-B c2i (CFG 4.0, top-k 2000), the weight bandwidth each decode step
achieves next to a measured memory-read bandwidth (the roofline of batch-1 decode), and the VQ-16 decode
time of one 256x256 image. Reference figures: the official code on the 2-core CPU machine (llamagen.md s12).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from generator.llamagen import ModelArgs, SamplingParams, VQArgs, build_gpt, build_vq, configure_runtime, gemv, sampling
from generator.llamagen.layout import choose_decode_layout
from generator.llamagen.model import KVCache, Transformer, find_multiple
from generator.llamagen.vq import ResnetBlock, Upsample, VQModel, winograd_available

# Official eager sampler, fp32, 2 threads, GPT-B, 256 tokens, CFG 4.0, top-k 2000 (llamagen.md section 12).
REFERENCE_TOK_S = {1: 14.6, 8: 67.0}
REFERENCE_VQ_DECODE_S = 1.3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best observed memory-copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats)


def read_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best observed read-only bandwidth in bytes/s: a sum over a tensor far larger than the caches.

    Decode only reads weights, so this, not half the copy bandwidth, bounds a step from below. On the CPU the
    faster of torch's sum and gemv.c's (a plain OpenMP loop, which read up to 1.6x faster than torch's on the
    AMD EPYC): the roofline must not be a slow reader's.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = nbytes / _best_seconds(src.sum, device, repeats)
    native = gemv.read_bandwidth(nbytes, repeats) if device.type == "cpu" else None
    return max(best, native or 0.0)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and the output head."""
    read = [model.layers, model.norm, model.output]
    return sum(p.numel() * p.element_size() for m in read for p in m.parameters())


def random_gpt(device: torch.device, dtype: torch.dtype, tuned: bool = True) -> Transformer:
    torch.manual_seed(0)
    model = build_gpt(ModelArgs.from_name("GPT-B"), device=device)
    with torch.no_grad():  # the official zero-initialised head gives uniform logits; use a realistic one
        torch.nn.init.normal_(model.output.weight, std=0.02)
    model = model.to(dtype).eval()
    if tuned:  # what load_gpt does: time each weight layout here, keep the fastest
        layout, timings = choose_decode_layout(model)
        if timings:
            steps = "; ".join(
                f"{name} " + ", ".join(f"{ms:.1f} at {rows} rows" for rows, ms in by_rows.items())
                for name, by_rows in timings.items()
            )
            print(f"  {DTYPE_NAMES[dtype]} decode layout: {layout} (one step, ms: {steps})")
    return model


def _labels(batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device) * 97 % 1000


def ours(model: Transformer, batch: int, tokens: int, compile: bool) -> torch.Tensor:
    device = model.tok_embeddings.weight.device
    return model.generate(
        _labels(batch, device), tokens, cfg_scale=4.0, top_k=2000, seed=list(range(batch)), compile=compile
    )


def _copying(cache: KVCache) -> None:
    update = cache.update

    def copy_whole_cache(input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k_all, v_all = update(input_pos, k, v)
        return k_all.repeat_interleave(1, dim=1), v_all.repeat_interleave(1, dim=1)  # the official copy

    cache.update = copy_whole_cache  # type: ignore[method-assign]


@torch.inference_mode()
def official_algorithm(model: Transformer, batch: int, tokens: int, compile: bool) -> torch.Tensor:
    """The official decode step on the same modules: attention over the whole masked cache, which is
    copied in every layer (its repeat_interleave by 1), weights in the nn.Linear layout."""
    device = model.tok_embeddings.weight.device
    params = SamplingParams(cfg_scale=4.0, top_k=2000)
    generators = sampling.make_generators(list(range(batch)), batch, device)
    labels = _labels(batch, device)
    cond = torch.cat([labels, model.null_condition(labels)])
    model.clear_caches()
    model.setup_caches(2 * batch, find_multiple(1 + tokens, 8))
    for layer in model.layers:
        assert layer.attention.kv_cache is not None
        _copying(layer.attention.kv_cache)
    key_ok = torch.ones(2 * batch, 1, 1, model.max_seq_length, dtype=torch.bool, device=device)

    def decode(x: torch.Tensor, pos: torch.Tensor, kv_len: int, mask: torch.Tensor | None) -> torch.Tensor:
        return model.decode_static(x, pos, key_ok)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        """The official tensor operations and draw (torch.multinomial, per row's generator), not gemv.c's
        probabilities pass nor sampling.sample's draw: the same-tokens check then covers both."""
        probs = sampling.logits_to_probs(sampling.combine_cfg(logits, params, True), params)
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generators, strict=True)])

    out = [sample(model.prefill(cond, torch.arange(model.prefix_len, device=device)))]
    for i in range(tokens - 1):
        pos = torch.tensor([1 + i], device=device)
        out.append(sample(decode(torch.cat([out[-1], out[-1]]), pos, 0, None)))
    model.clear_caches()
    return torch.cat(out, dim=1)


Sampler = Callable[[Transformer, int, int, bool], torch.Tensor]


def best_time(
    runs: list[tuple[Sampler, Transformer]], batch: int, tokens: int, compile: bool, repeats: int
) -> list[tuple[float, torch.Tensor]]:
    """Warm up each sampler, then time them interleaved (same machine load) and keep each one's best."""
    device = runs[0][1].tok_embeddings.weight.device
    results: list[tuple[float, torch.Tensor]] = []
    for fn, model in runs:
        # Warm-up; a compiled decode is specialised to its cache length, so it warms up at full length.
        ids = fn(model, batch, tokens if compile else min(tokens, 16), compile)
        results.append((float("inf"), ids))
    for _ in range(repeats):
        for i, (fn, model) in enumerate(runs):
            _sync(device)
            t0 = time.perf_counter()
            ids = fn(model, batch, tokens, compile)
            _sync(device)
            results[i] = (min(results[i][0], time.perf_counter() - t0), ids)
    return results


def greedy_matches_teacher_forcing(model: Transformer, tokens: int) -> bool:
    """Cached greedy decoding (CFG off) equals the arg-max of the full forward at every position."""
    labels = torch.tensor([207], device=model.tok_embeddings.weight.device)
    ids = model.generate(labels, tokens, cfg_scale=1.0, top_k=1, seed=0)
    logits = model.forward_logits(labels, ids[:, :-1])
    return bool((logits.argmax(-1) == ids).all())


def _official_convolutions(vq: VQModel) -> None:
    """The official algorithm: direct 3x3 convs, and Upsample's conv over the 2x nearest-upsampled input."""
    for module in vq.modules():
        if isinstance(module, ResnetBlock):
            module.winograd = False
        if isinstance(module, Upsample):
            conv = module.conv

            def upsample_then_conv(x: torch.Tensor, conv: torch.nn.Conv2d = conv) -> torch.Tensor:
                return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

            module.forward = upsample_then_conv  # type: ignore[method-assign]


def time_vq_decode(device: torch.device, repeats: int = 2) -> tuple[float, float, float]:
    """Best decode seconds of ours (Winograd 3x3 convs from 64 px, phase convs for upsampling) and of the
    official algorithm (NCHW, direct convs, conv over the upsampled input), timed interleaved on the same
    weights, and the largest difference between their images."""
    torch.manual_seed(0)
    official = build_vq(VQArgs.from_name("VQ-16"), device=device).eval()
    _official_convolutions(official)
    ours = build_vq(VQArgs.from_name("VQ-16"), device=device).eval()
    ours.load_state_dict(official.state_dict())
    if device.type == "cpu" and not winograd_available():
        ours.use_channels_last()  # what load_vq does
    codes = torch.randint(0, 16384, (1, 256), device=device)
    diff = (ours.decode_codes(codes, grid=(16, 16)) - official.decode_codes(codes, grid=(16, 16))).abs().max()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, vq in enumerate((ours, official)):
            _sync(device)
            t0 = time.perf_counter()
            vq.decode_codes(codes, grid=(16, 16))
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1], float(diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the reference used 2)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compiled static decode (CUDA graphs; inductor on CPU, where it pays at batch 1 only)",
    )
    parser.add_argument("--skip-vq", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (best kept)")
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the official-algorithm run on the same weights (fp32)",
    )
    args = parser.parse_args()

    device = configure_runtime(num_threads=args.threads, allow_tf32=False)
    torch.manual_seed(0)
    bw, read_bw = copy_bandwidth(device), read_bandwidth(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"memory bandwidth: read {read_bw / 1e9:.1f} GB/s (sum; the best read figure of each row is its roofline),"
        f" copy {bw / 1e9:.1f} GB/s (read + write; half of it was the roofline before)"
    )
    print("GPT-B c2i, random weights, CFG 4.0, top-k 2000, per-row seeds")
    header = "dtype batch  tok/s  ms/step  weights/step  weight GB/s  read GB/s  roofline ms  x roofline  vs official"
    print(header)
    for name in args.dtypes:
        model = random_gpt(device, DTYPES[name])
        if name == "fp32":
            print(f"  fp32 greedy cached == teacher-forced arg-max: {greedy_matches_teacher_forcing(model, 64)}")
        runs: list[tuple[Sampler, Transformer]] = [(ours, model)]
        if name == "fp32" and args.baseline:
            runs.append((official_algorithm, random_gpt(device, DTYPES[name], tuned=False)))
        weight_bytes = decode_weight_bytes(model)
        for batch in args.batches:
            bw_before = read_bandwidth(device)
            results = best_time(runs, batch, args.tokens, args.compile, args.repeats)
            # The machine's speed drifts: the roofline uses the best bandwidth seen before, at and after the run.
            best_bw = max(read_bw, bw_before, read_bandwidth(device))
            seconds = results[0][0]
            step_ms = 1e3 * seconds / args.tokens
            roofline_ms = 1e3 * weight_bytes / best_bw  # a step must at least read every weight once
            ref = REFERENCE_TOK_S.get(batch) if name == "fp32" else None
            tok_s = batch * args.tokens / seconds
            vs = f"{tok_s / ref:.2f}x" if ref else "-"
            print(
                f"{name:>5} {batch:5d} {tok_s:6.1f} {step_ms:8.1f} {weight_bytes / 1e6:10.0f} MB"
                f" {weight_bytes / (step_ms / 1e3) / 1e9:11.1f} {best_bw / 1e9:10.1f} {roofline_ms:11.1f}"
                f" {step_ms / roofline_ms:10.2f}  {vs:>10}"
            )
            if len(results) > 1:
                base_s, base_ids = results[1]
                print(
                    f"      official algorithm, same weights and load: {batch * args.tokens / base_s:6.1f} tok/s"
                    f" ({1e3 * base_s / args.tokens:.1f} ms/step): ours is {base_s / seconds:.2f}x;"
                    f" same tokens: {torch.equal(base_ids, results[0][1])}"
                )
        del model, runs
    if not args.skip_vq:
        vq_s, base_s, diff = time_vq_decode(device)
        print(
            f"VQ-16 decode 256x256: {vq_s:.2f} s (official {REFERENCE_VQ_DECODE_S} s: "
            f"{REFERENCE_VQ_DECODE_S / vq_s:.2f}x); official algorithm, same weights and load: {base_s:.2f} s,"
            f" ours is {base_s / vq_s:.2f}x; max |difference| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
