"""The shared training loop: learning-rate schedule, early stop on the curve, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from generator.demo.config import TrainSchedule
from generator.demo.training import STATE_FILE, TrainingError, lr_at, train

SCHEDULE = TrainSchedule(steps=6, batch_size=4, lr=0.1, warmup=2, checkpoint_every=1)


def _run(run_dir: Path, schedule: TrainSchedule) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = torch.randn(32, 3)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randperm(32, generator=generator)[: schedule.batch_size]
        return (model(data[idx]) - 1).pow(2).mean()

    return train(name="t", run_dir=run_dir, model=model, schedule=schedule, seed=1, loss_fn=loss_fn)


def test_lr_warms_up_linearly_then_decays_to_a_tenth() -> None:
    s = TrainSchedule(steps=100, batch_size=1, lr=1.0, warmup=10)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(100, s) == pytest.approx(0.1)
    assert lr_at(40, s) > lr_at(70, s)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = _run(tmp_path / "whole", SCHEDULE)
    _run(tmp_path / "split", TrainSchedule(**{**SCHEDULE.__dict__, "stop_at": 3}))
    resumed = _run(tmp_path / "split", SCHEDULE)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_stop_at_ends_training_early_and_records_the_step(tmp_path: Path) -> None:
    _run(tmp_path, TrainSchedule(**{**SCHEDULE.__dict__, "stop_at": 2}))
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 2


def test_resuming_with_another_schedule_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, SCHEDULE)
    with pytest.raises(TrainingError, match="another schedule"):
        _run(tmp_path, TrainSchedule(**{**SCHEDULE.__dict__, "lr": 0.5}))


def test_a_bf16_schedule_runs_its_matmuls_in_bfloat16_and_cannot_resume_a_float32_run(tmp_path: Path) -> None:
    seen: list[torch.dtype] = []
    model = nn.Linear(3, 1)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        out = model(torch.randn(4, 3, generator=generator))
        seen.append(out.dtype)
        return (out.float() - 1).pow(2).mean()

    bf16 = TrainSchedule(**{**SCHEDULE.__dict__, "bf16": True})
    train(name="t", run_dir=tmp_path / "bf16", model=model, schedule=bf16, seed=1, loss_fn=loss_fn)
    assert set(seen) == {torch.bfloat16} and model.weight.dtype == torch.float32
    _run(tmp_path / "fp32", SCHEDULE)
    with pytest.raises(TrainingError, match="another schedule"):
        _run(tmp_path / "fp32", bf16)


def test_force_makes_a_training_step_start_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from generator.demo import cli

    run_dir = tmp_path / "work" / "runs" / "clip"
    run_dir.mkdir(parents=True)
    (run_dir / STATE_FILE).write_bytes(b"a run of another schedule")
    seen: list[bool] = []
    monkeypatch.setitem(cli.COMMANDS, "train-clip", ("", lambda paths, args: seen.append(run_dir.exists())))
    common = ["--models-dir", str(tmp_path / "models"), "--work-dir", str(tmp_path / "work"), "train-clip"]
    cli.main(common)
    assert seen == [True]  # without --force the run resumes (or refuses another schedule)
    cli.main([*common, "--force"])
    assert seen == [True, False]


def test_a_bad_training_folder_is_named_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from generator.demo import cli

    missing = tmp_path / "no-such-folder"
    code = cli.main(["--models-dir", str(tmp_path / "models"), "--work-dir", str(tmp_path), "train-vq",
                     "--data", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"train-vq: error: {missing}: not a directory" in err
    assert "Traceback" not in err


def test_gpt_training_loads_the_tokenizer_with_the_arguments_stored_beside_its_weights(tmp_path: Path) -> None:
    from generator.demo import cli
    from generator.demo.config import DemoPaths
    from generator.demo.train_vq import _plain
    from generator.llamagen import VQArgs, build_vq, save_checkpoint

    args = VQArgs(codebook_size=32, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32)  # not the config's
    paths = DemoPaths(models_dir=tmp_path / "models", work_dir=tmp_path / "work")
    paths.model_file("vq").parent.mkdir(parents=True)
    save_checkpoint(build_vq(args, "cpu"), paths.model_file("vq"), args=_plain(args))
    assert cli._load_demo_vq(paths).args == args
