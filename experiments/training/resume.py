"""A long run's state after each epoch, so that an interrupted final, baseline, seed or
pretraining run picks up at its next epoch instead of epoch 0.

`fit(..., resume=path)` writes, after every epoch that does not end the run, the model,
optimizer, schedule, EMA average, best epoch so far (its weights included), the epoch rows
and the random-number generators' states to `path` (atomically: a temporary file, then a
rename), and reads it back when it starts. The file holds tensors, numbers and text only and
is read with `torch.load(weights_only=True)`; one that does not load is reported in one line
and the run starts at epoch 0. The caller keys `path` by the run's settings, data, device and step engine
(`experiments.training.runner.resume_path`) and deletes it once the run is complete.
Runs with SWA are not resumed (its average and schedule start mid-run): they start over.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from experiments.training.checkpoint import save_atomically

FORMAT = 1  # bump when the saved fields change: a state of another format is not read


def resumable(cfg) -> bool:
    return cfg.swa_start <= 0


def save(path: Path, epoch: int, step, average, best, history: list[dict[str, float]]) -> None:
    """The state after `epoch` (0-based): the next run of the same key starts at epoch + 1."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "epoch": epoch,
        "model": step.model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict() if step.scheduler is not None else None,
        "averaged": average.averaged.state_dict() if average.averaged is not None else None,
        "best": {"loss": best.loss, "acc": best.acc, "epoch": best.epoch, "state": best.state},
        "history": history,
        "rng": torch.get_rng_state(),
        "generator": step.generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    save_atomically(state, path)


def restore(path: Path, step, average, best, label: str) -> tuple[int, list[dict[str, float]]]:
    """Load the state at `path` into the run's objects: (first epoch to train, rows so far);
    (0, []) where there is none or it cannot be read. A state that reads but does not fit the
    run (the model's code changed under the same settings) stops the run in one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a resume state of format {FORMAT}")
    except FileNotFoundError:
        return 0, []
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        print(f"{path}: cannot resume from it ({exc}); starting at epoch 0", file=sys.stderr)
        return 0, []
    try:
        _apply(state, step, average, best)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"{path}: this resume state does not fit the run ({str(exc).splitlines()[0]}); "
            "delete it to start the run over"
        ) from exc
    start = int(state["epoch"]) + 1
    print(f"{label} resuming at epoch {start} from {path}", file=sys.stderr, flush=True)
    return start, list(state["history"])


def _apply(state: dict, step, average, best) -> None:
    device = next(step.model.parameters()).device
    step.model.load_state_dict(state["model"])
    # load_state_dict swaps in copies of the saved groups: a learning rate that is a device
    # tensor (graphs.py: the graph reads it, the schedule fills it) must stay that tensor
    live = [group["lr"] for group in step.optimizer.param_groups]
    step.optimizer.load_state_dict(state["optimizer"])
    for group, lr in zip(step.optimizer.param_groups, live, strict=True):
        if isinstance(lr, torch.Tensor):
            lr.copy_(group["lr"])
            group["lr"] = lr
    if step.scheduler is not None:
        step.scheduler.load_state_dict(state["scheduler"])
    if average.averaged is not None:
        average.averaged.load_state_dict(state["averaged"])
    kept = state["best"]
    best.loss, best.acc, best.epoch = kept["loss"], kept["acc"], kept["epoch"]
    best.state = {k: v.to(device) for k, v in kept["state"].items()}
    torch.set_rng_state(state["rng"])
    step.generator.set_state(state["generator"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
