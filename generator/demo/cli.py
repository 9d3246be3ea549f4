"""Command line of the demo model family: `python -m generator.demo <command>` (`all` runs every step)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from generator.demo import config
from generator.demo.config import DemoPaths
from generator.demo.dataset import DatasetError
from generator.demo.training import TrainingError
from generator.llamagen import VQModel
from generator.llamagen.loading import CheckpointError
from generator.registry import RegistryError

log = logging.getLogger("generator.demo")


def _cmd_dataset(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.dataset import write_shapes_split

    for (kind, split), (offset, count) in config.SPLITS.items():
        directory = paths.data_dir(kind, split)
        if (directory / "manifest.json").is_file() and not args.force:
            log.info("dataset %s-%s exists at %s (use --force to rewrite)", kind, split, directory)
            continue
        write_shapes_split(directory, kind=kind, split=split, seed=config.SEED + offset, count=count)  # type: ignore[arg-type]
        log.info("dataset %s-%s: %d images written to %s", kind, split, count, directory)


def _cmd_train_vq(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.train_vq import train_vq

    data = args.data or paths.data_dir("t2i", "train")
    train_vq(data, paths.run_dir("vq"), args.out or paths.model_file("vq"))


def _load_demo_vq(paths: DemoPaths) -> VQModel:
    """The trained tokenizer, built from the arguments stored beside its weights (config ones if absent)."""
    from generator.demo.train_vq import demo_vq_args
    from generator.llamagen import VQArgs, load_vq
    from generator.llamagen.loading import read_checkpoint

    path = paths.model_file("vq")
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python -m generator.demo train-vq` first")
    stored = read_checkpoint(path).get("args")
    return load_vq(path, model=VQArgs.from_dict(stored) if stored else demo_vq_args(), device="cpu")


def _cmd_train_c2i(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.train_gpt import train_c2i

    data = args.data or paths.data_dir("c2i", "train")
    train_c2i(
        data,
        _load_demo_vq(paths),
        paths.model_file("vq"),
        paths.run_dir("c2i"),
        args.out or paths.model_file("c2i"),
    )


def _cmd_train_t2i(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.train_gpt import train_t2i

    data = args.data or paths.data_dir("t2i", "train")
    train_t2i(
        data,
        _load_demo_vq(paths),
        paths.model_file("vq"),
        paths.run_dir("t2i"),
        args.out or paths.model_file("t2i"),
    )


def _cmd_train_clip(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.train_clip import train_clip, write_usage_notes

    data = args.data or paths.data_dir("t2i", "train")
    weights = args.out or paths.model_file("clip")
    train_clip(data, paths.run_dir("clip"), weights, paths.model_file("clip_config"))
    write_usage_notes(paths.models_dir / "demo" / "CLIP.md", paths.model_file("clip_config"), weights)


def _cmd_cards(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.cards import write_all_cards

    for path in write_all_cards(paths):
        log.info("card written: %s", path)


def _cmd_evaluate(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo import evaluate
    from generator.demo.cards import set_metrics
    from generator.demo.dataset import load_image_set
    from generator.registry import Registry

    registry = Registry(paths.models_dir)
    c2i, t2i = registry.load("demo-shapes-c2i", "cpu"), registry.load("demo-shapes-t2i", "cpu")
    heldout_t2i = load_image_set(paths.data_dir("t2i", "heldout"))
    heldout_c2i = load_image_set(paths.data_dir("c2i", "heldout"))
    vq_metrics = evaluate.evaluate_vq(c2i.vq, heldout_t2i)
    c2i_metrics = evaluate.evaluate_c2i(c2i)
    t2i_metrics = evaluate.evaluate_t2i(t2i, heldout_t2i)
    clip_metrics = evaluate.evaluate_clip(
        paths.model_file("clip_config"), paths.model_file("clip"), heldout_c2i, heldout_t2i
    )
    for name, metrics in (
        ("demo-shapes-c2i", {**vq_metrics, **c2i_metrics}),
        ("demo-shapes-t2i", {**vq_metrics, **t2i_metrics, **clip_metrics}),
    ):
        card = set_metrics(paths.models_dir / f"{name}.yaml", metrics)
        log.info("%s: %s", name, ", ".join(f"{k}={m.value:.4g}" for k, m in card.metrics.items()))
    Registry.clear_cache()  # the cards' content hashes changed with their metrics


def _cmd_sample_grid(paths: DemoPaths, args: argparse.Namespace) -> None:
    from generator.demo.grid import sample_grid
    from generator.registry import Registry

    registry = Registry(paths.models_dir)
    out = args.out or paths.model_file("grid")
    entries = sample_grid(registry.load("demo-shapes-t2i", "cpu"), registry.load("demo-shapes-c2i", "cpu"), out)
    log.info("sample grid of %d images written to %s (legend beside it)", len(entries), out)


COMMANDS: dict[str, tuple[str, Callable[[DemoPaths, argparse.Namespace], None]]] = {
    "dataset": ("render the shapes splits (train and held-out, c2i and t2i)", _cmd_dataset),
    "train-vq": ("train the VQ tokenizer", _cmd_train_vq),
    "train-c2i": ("train the class-conditional GPT on VQ codes", _cmd_train_c2i),
    "train-t2i": ("train the text-conditional GPT on VQ codes and MiniLM caption features", _cmd_train_t2i),
    "train-clip": ("train the small open_clip model used by the output concept classifier", _cmd_train_clip),
    "cards": ("write the model cards (demo, with checkpoint SHA-256; official LlamaGen)", _cmd_cards),
    "evaluate": ("measure the demo models and write the figures onto their cards", _cmd_evaluate),
    "sample-grid": ("generate the README sample grid", _cmd_sample_grid),
}


def _discard_run(run_dir: Path) -> None:
    """Delete a resumable training run, so the step starts from step 0 (even with another schedule)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
        log.info("--force: deleted the resumable run in %s", run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m generator.demo", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="where cards and weights go")
    parser.add_argument("--work-dir", type=Path, default=Path("var/demo"), help="data sets and resumable runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--force",
            action="store_true",
            help="redo the step even if its output exists (training starts afresh: the resumable run is deleted)",
        )
        p.add_argument(
            "--data",
            type=Path,
            default=None,
            help="training folder: a rendered split, or images with same-name .txt captions "
            "(t2i) or class sub-folders (c2i)",
        )
        p.add_argument("--out", type=Path, default=None, help="where to write the weights")
    sub.add_parser("all", help="every step in order: " + ", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = DemoPaths(models_dir=args.models_dir, work_dir=args.work_dir)
    steps = list(COMMANDS) if args.command == "all" else [args.command]
    for name in steps:
        started = time.perf_counter()
        step_args = args if args.command != "all" else argparse.Namespace(force=False, data=None, out=None)
        if step_args.force and name.startswith("train-"):
            _discard_run(paths.run_dir(name.removeprefix("train-")))
        try:
            COMMANDS[name][1](paths, step_args)
        except (DatasetError, TrainingError, CheckpointError, RegistryError, FileNotFoundError) as exc:
            # Bad input (a folder, a file, a card): say which and stop, without a traceback.
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
        log.info("%s done in %.0f s", name, time.perf_counter() - started)
    return 0
