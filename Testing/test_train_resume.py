"""Checkpoints, --resume and `accelerate launch` on several processes (two CPU processes here:
the same DDP code path as several GPUs, with the gloo backend)."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt
from progidiff import checkpoints
from progidiff.errors import InputError
from progidiff.train import TrainConfig, train


class _Stop(Exception):
    """Stands in for a killed run."""


def _tiny(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(dataset), output=str(out), organs=("liver", "kidney_left"), stage1_steps=4, stage2_steps=6,
                batch_size=4, grid_size=32, grid_spacing=(12.0, 12.0, 10.0), channels=(8, 16, 16, 16),
                encoder_channels=(8, 8, 8), workers=0, checkpoint_every=3)
    base.update(kw)
    return TrainConfig(**base)


def _stop_at(stage: int, step: int):
    def on_step(s: int, k: int, loss: float) -> None:
        if (s, k) == (stage, step):
            raise _Stop
    return on_step


def _log(out: Path) -> list[tuple[int, int, str]]:
    with open(out / "train_log.csv", newline="", encoding="utf-8") as f:
        return [(int(r["stage"]), int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_a_run_stopped_twice_and_resumed_ends_as_an_unbroken_run(tmp_path, tiny_dataset):
    unbroken = train(_tiny(tiny_dataset, tmp_path / "unbroken"), progress=False)

    out = tmp_path / "stopped"
    with pytest.raises(_Stop):  # inside stage 1: the last checkpoint is stage 1, step 3
        train(_tiny(tiny_dataset, out), progress=False, on_step=_stop_at(1, 4))
    with pytest.raises(_Stop):  # inside stage 2, past its step-3 checkpoint
        train(_tiny(tiny_dataset, out, resume=True), progress=False, on_step=_stop_at(2, 5))
    assert json.loads((out / "checkpoints" / "state.json").read_text(encoding="utf-8"))["step"] == 3
    train(_tiny(tiny_dataset, out, resume=True), progress=False)

    a, b = load_file(str(unbroken / "diffusion_pytorch_model.safetensors")), load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same weights as the unbroken run"
    # Every step logged once, with the unbroken run's losses (same noise, slices and moments).
    assert _log(out) == _log(unbroken)
    assert [(s, k) for s, k, _ in _log(out)] == [(1, k) for k in range(1, 5)] + [(2, k) for k in range(1, 7)]
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["resumed_at_stage_step"] == [[1, 3], [2, 3]]
    assert not (out / "checkpoints").exists()


def test_resume_refuses_another_run_s_checkpoint_and_a_finished_model(tmp_path, tiny_dataset):
    out = tmp_path / "m"
    with pytest.raises(_Stop):
        train(_tiny(tiny_dataset, out), progress=False, on_step=_stop_at(1, 4))
    with pytest.raises(InputError, match=r"other lr"):
        train(_tiny(tiny_dataset, out, resume=True, lr=1e-3), progress=False)
    # The same dataset through another path is the same run; the checkpoint still resumes.
    rel = os.path.relpath(tiny_dataset, tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        train(_tiny(Path(rel), out, resume=True), progress=False)
    finally:
        os.chdir(cwd)
    with pytest.raises(InputError, match="finished model"):
        train(_tiny(tiny_dataset, out, resume=True), progress=False)


def test_a_fresh_run_clears_the_previous_run_s_checkpoint_and_log(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "state.json").write_text("{}", encoding="utf-8")
    (tmp_path / "train_log.csv").write_text("stage,step,loss\n1,1,0.5\n", encoding="utf-8")
    cfg = TrainConfig(dataset="d", output=str(tmp_path))
    assert checkpoints.start(cfg, tmp_path, processes=1, main=True) == checkpoints.RunState()
    assert not ckpt.exists() and not (tmp_path / "train_log.csv").exists()


def test_resume_refuses_another_number_of_processes(tmp_path):
    cfg = TrainConfig(dataset="d", output=str(tmp_path), resume=True)
    (tmp_path / "checkpoints").mkdir()
    state = {"stage": 2, "step": 5, "seconds": 1.0, "processes": 2, "options": checkpoints.run_options(cfg)}
    (tmp_path / "checkpoints" / "state.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(InputError, match="--num_processes 2"):
        checkpoints.start(cfg, tmp_path, processes=1, main=True)
    assert checkpoints.start(cfg, tmp_path, processes=2, main=True).step == 5


def test_a_checkpoint_from_before_an_option_existed_resumes_if_the_run_uses_its_default(tmp_path):
    """A checkpoint written before --holdout-cases existed has no such key: the run had its default."""
    cfg = TrainConfig(dataset="d", output=str(tmp_path), resume=True)
    (tmp_path / "checkpoints").mkdir()
    older = {k: v for k, v in checkpoints.run_options(cfg).items() if k not in ("holdout_cases", "holdout_case_names")}
    state = {"stage": 2, "step": 5, "seconds": 1.0, "processes": 1, "options": older}
    (tmp_path / "checkpoints" / "state.json").write_text(json.dumps(state), encoding="utf-8")
    assert checkpoints.start(cfg, tmp_path, processes=1, main=True).step == 5
    cfg.holdout_cases = 2  # asking for another split than the run had: refused
    with pytest.raises(InputError, match="holdout_cases"):
        checkpoints.start(cfg, tmp_path, processes=1, main=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` on two processes. Without GPUs accelerate runs them as MULTI_CPU
    (gloo) when ACCELERATE_USE_CPU is set: the same DDP code path as several GPUs."""
    # GPUs hidden: two processes on the one GPU of a lent machine is not this test's path.
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port())] + script
    return subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300, cwd=tmp_path)


def test_accelerate_launch_trains_on_two_processes_and_resumes_a_stopped_run(tmp_path, tiny_dataset):
    """The README's `accelerate launch -m progidiff.cli train ...`, unchanged, on two processes;
    a run stopped by Ctrl-C and resumed ends where the unbroken one ends."""
    def args(out: str) -> list[str]:
        return ["train", str(tiny_dataset), "-o", out, "--organs", "liver", "kidney_left", "--stage1-steps", "2",
                "--stage2-steps", "4", "--batch-size", "2", "--workers", "0", "--checkpoint-every", "2"]

    run = _launch(["-m", "progidiff.cli"] + args("unbroken"), tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("model saved to") == 1
    unbroken = tmp_path / "unbroken"
    assert json.loads((unbroken / "model_card.json").read_text(encoding="utf-8"))["training"]["processes"] == 2
    # One log, written by the main process; every stage's learning rate falls to 0 once.
    with open(unbroken / "train_log.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["stage"]), int(r["step"])) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    for stage in ("1", "2"):
        lrs = [float(r["lr"]) for r in rows if r["stage"] == stage]
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0, lrs

    stopped = _launch([str(Path(__file__).with_name("interrupt_train.py")), "2", "3"] + args("stopped"), tmp_path)
    assert stopped.returncode != 0 and "--resume to go on" in stopped.stderr, stopped.stderr[-2000:]
    run = _launch(["-m", "progidiff.cli"] + args("stopped") + ["--resume"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    a = load_file(str(unbroken / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "each process resumed its own noise and slices"
    assert _log(tmp_path / "stopped") == _log(unbroken)

    # A scheduler's SIGTERM that reaches process 1 alone, after stage 2's step 3 (no periodic
    # checkpoint there): both processes stop after that step and save it; the resumed run ends as
    # the unbroken one. Without the all-reduce of the request, process 1 waited in the checkpoint's
    # barrier while process 0 went on.
    env = {"INTERRUPT_SIGNAL": "SIGTERM", "INTERRUPT_PROCESS": "1"}
    sigterm = _launch([str(Path(__file__).with_name("interrupt_train.py")), "2", "3"] + args("sigterm"), tmp_path, env)
    assert sigterm.returncode != 0 and "after stage 2, step 3" in sigterm.stderr, sigterm.stderr[-2000:]
    assert json.loads((tmp_path / "sigterm" / "checkpoints" / "state.json").read_text(encoding="utf-8"))["step"] == 3
    run = _launch(["-m", "progidiff.cli"] + args("sigterm") + ["--resume"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    b = load_file(str(tmp_path / "sigterm" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli_train(dataset: Path, out: Path) -> list[str]:
    """A command-line run long enough to signal mid stage 2, with no periodic checkpoint in it."""
    return ["-m", "progidiff.cli", "train", str(dataset), "-o", str(out), "--organs", "liver",
            "kidney_left", "--stage1-steps", "3", "--stage2-steps", "40", "--batch-size", "2", "--workers", "1",
            "--checkpoint-every", "1000"]


@pytest.fixture(scope="module")
def unbroken_cli_run(tmp_path_factory, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("unbroken") / "m"
    subprocess.run([sys.executable, *_cli_train(tiny_dataset, out)], check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C to its process group"])
def test_a_signal_mid_run_saves_that_step_and_the_resumed_run_ends_as_the_unbroken_one(how, tmp_path, tiny_dataset,
                                                                                       unbroken_cli_run):
    """A scheduler's or `timeout`'s SIGTERM, or a terminal's Ctrl-C (which reaches the data-loading
    worker too), mid stage 2: the step ends and is saved as a checkpoint although none was due, the
    command exits 130 with one line, and --resume ends where the unbroken run ends. Before, SIGTERM
    killed the run at once (rc -15) and both lost every step since the stage began."""
    out = tmp_path / "m"
    rc, seen, rest = interrupt(_cli_train(tiny_dataset, out), tmp_path, signal.SIGINT if "Ctrl-C" in how else
                               signal.SIGTERM, r"stage 2: .*\| ?[2-9]/40 \[", group="Ctrl-C" in how)
    assert rc == 130, (seen + rest)[-2000:]
    assert "Traceback" not in rest, rest[-2000:]
    state = json.loads((out / "checkpoints" / "state.json").read_text(encoding="utf-8"))
    stage, step, _ = _log(out)[-1]
    assert (state["stage"], state["step"]) == (stage, step) == (2, step) and 2 <= step < 40, (state, rest[-1000:])
    assert f"after stage 2, step {step}" in rest and "--resume" in rest

    run = subprocess.run([sys.executable, *_cli_train(tiny_dataset, out), "--resume"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    a = load_file(str(unbroken_cli_run / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the checkpoint held that step's weights, moments and noise"
    assert _log(out) == _log(unbroken_cli_run)


def test_precision_is_accelerates_unless_the_command_names_one(monkeypatch, tmp_path):
    """`accelerate launch --mixed_precision bf16 progidiff train ...` trains in bf16 (it sets this
    variable); an explicit --mixed-precision wins; the card and checkpoints get what ran."""
    from accelerate.state import AcceleratorState

    from progidiff.train import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        AcceleratorState._reset_state(True)
        cfg = TrainConfig(dataset=str(tmp_path), output=str(tmp_path / "m"))
        assert make_accelerator(cfg).mixed_precision == "bf16"
        assert checkpoints.run_options(cfg)["mixed_precision"] == "bf16"
        AcceleratorState._reset_state(True)
        cfg = TrainConfig(dataset=str(tmp_path), output=str(tmp_path / "m"), mixed_precision="no")
        assert make_accelerator(cfg).mixed_precision == "no" and cfg.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)
