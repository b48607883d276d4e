"""Training checkpoints: what ``progidiff train --resume`` needs to continue a stopped run as if
it had never stopped: the weights, the optimizer, every process's random stream (noise,
timesteps, prompt synonyms), the training time already spent, and the loss log cut back to
the checkpoint. accelerate's own ``save_state`` keeps the weights and optimizer, but neither the
step inside a two-stage run nor a ``torch.Generator`` that is not the global one, so this
module writes the few files itself.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .outputs import replaced_whole

log = logging.getLogger(__name__)

STATE = "state.json"
#: The loss log beside the model: one row per step, cut back to the checkpoint on resume.
LOG = "train_log.csv"
MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
#: Options that do not change what a run learns: a resumed run may change them.
_FREE_OPTIONS = ("output", "resume", "workers", "command", "extra", "checkpoint_every")
#: Folders, compared as absolute paths: a run resumed from another working directory is the same run.
_FOLDER_OPTIONS = ("dataset", "base_model", "init_from")


def folder(out: Path) -> Path:
    """Where a run writing the model ``out`` keeps its checkpoints (removed once the model is saved)."""
    return out / "checkpoints"


@dataclass
class RunState:
    """Where a run stands: the next step to run is ``step + 1`` of ``stage``."""

    stage: int = 1
    step: int = 0
    #: Training time spent before this process started (s).
    seconds: float = 0.0
    #: (stage, step) of every resume so far, for the model card.
    resumed_at: list = field(default_factory=list)


def run_options(cfg) -> dict:
    """The training options a checkpoint belongs to, as JSON gives them back."""
    opts = {k: v for k, v in asdict(cfg).items() if k not in _FREE_OPTIONS}
    for k in _FOLDER_OPTIONS:
        if opts.get(k):
            opts[k] = str(Path(opts[k]).resolve())
    return json.loads(json.dumps(opts, sort_keys=True))


def start(cfg, out: Path, processes: int, main: bool) -> RunState:
    """The state a run starts from. With ``cfg.resume`` and a checkpoint in ``out``: the
    checkpoint's (refused when it was written with other options or another number of
    processes, which would draw other slices), the loss log cut back to it. Otherwise from
    scratch, a previous run's checkpoints and log removed so that they cannot mix with this one's."""
    ckpt = folder(out)
    log_path = out / LOG
    if not cfg.resume:
        if main:
            shutil.rmtree(ckpt, ignore_errors=True)
            log_path.unlink(missing_ok=True)
        return RunState()
    if not (ckpt / STATE).is_file():
        if (out / "config.json").is_file():
            raise InputError(f"{out} holds a finished model and no checkpoint to resume; "
                             "train into a new folder (or drop --resume to train this one again).")
        log.info("no checkpoint in %s: starting from the first step", ckpt)
        return RunState()
    saved = json.loads((ckpt / STATE).read_text(encoding="utf-8"))
    # An option newer than the checkpoint is missing from it: the run had its default then.
    defaults = run_options(type(cfg)(dataset=cfg.dataset, output=cfg.output))
    stored = saved.get("options", {})
    changed = sorted(k for k, v in run_options(cfg).items() if stored.get(k, defaults.get(k)) != v)
    if changed:
        raise InputError(f"--resume: the checkpoint in {ckpt} was written with other {', '.join(changed)}; "
                         "resume with the options it was started with.")
    if saved.get("processes", 1) != processes:
        raise InputError(f"--resume: the checkpoint was written by {saved.get('processes', 1)} process(es), this run has "
                         f"{processes}; resume with accelerate launch --num_processes {saved.get('processes', 1)}.")
    state = RunState(stage=saved["stage"], step=saved["step"], seconds=saved["seconds"],
                     resumed_at=saved.get("resumed_at", []) + [[saved["stage"], saved["step"]]])
    if main and log_path.is_file():
        _cut_log(log_path, state)
    log.info("resuming at stage %d step %d (%.0f s of training before)", state.stage, state.step, state.seconds)
    return state


def _cut_log(log_path: Path, state: RunState) -> None:
    """Drop the log's rows after the checkpoint: the resumed run writes those steps again."""
    with open(log_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if (int(r[0]), int(r[1])) <= (state.stage, state.step)]
    with replaced_whole(log_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(kept)


def load(out: Path, state: RunState, model: torch.nn.Module, generator: torch.Generator, process: int) -> None:
    """The checkpoint's weights and this process's random stream into ``model`` and ``generator``."""
    ckpt = folder(out)
    model.load_state_dict(torch.load(ckpt / MODEL, map_location="cpu"))
    rng = ckpt / f"rng-{process}.pt"
    saved = torch.load(rng) if rng.is_file() else {}
    if (saved.get("stage"), saved.get("step")) == (state.stage, state.step):
        generator.set_state(saved["state"])
    else:
        log.warning("%s is missing or from another step: the resumed run draws other noise than an unbroken one", rng)


def load_optimizer(out: Path, state: RunState, stage: int, optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer's moments when the checkpoint is inside ``stage``; False at a stage's start."""
    path = folder(out) / OPTIMIZER
    if stage != state.stage or not path.is_file():
        return False
    optimizer.load_state_dict(torch.load(path, map_location="cpu"))
    return True


def save(accelerator, out: Path, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         generator: torch.Generator, stage: int, step: int, seconds: float, resumed_at: list) -> None:
    """Write a checkpoint after ``step`` of ``stage`` (``optimizer`` None at a stage's end).
    Every process writes its random stream; the main process then the weights, and the state
    last, each by an atomic rename, so that a run killed mid-write resumes from the last whole one."""
    ckpt = folder(out)
    if accelerator.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    _atomic_save({"stage": stage, "step": step, "state": generator.get_state()},
                 ckpt / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    _atomic_save(model.state_dict(), ckpt / MODEL)
    if optimizer is not None:
        _atomic_save(optimizer.state_dict(), ckpt / OPTIMIZER)
    else:
        (ckpt / OPTIMIZER).unlink(missing_ok=True)
    state = {"stage": stage, "step": step, "seconds": round(seconds, 1), "resumed_at": resumed_at,
             "processes": accelerator.num_processes, "options": run_options(cfg)}
    with replaced_whole(ckpt / STATE) as tmp:
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")


def _atomic_save(obj, path: Path) -> None:
    with replaced_whole(path) as tmp:
        torch.save(obj, tmp)
