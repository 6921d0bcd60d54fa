"""Live curves in experiment trackers (--report-to), through Accelerate's own tracker classes.

Each run folder (a train_distill.py run; an imp.py round, an lmc.py copy) is one tracker run. It receives exactly
the scalars written to that folder's metrics.csv, at the same global steps (the MetricLog forwards every row it
records), and the run's configuration as hyperparameters. A resumed run continues its tracker run: the caller
passes a run id that is stored in its checkpoints, so a resumption reuses it and a run started over gets a new
one. TensorBoard writes to `<run folder>/tensorboard`; on resumption it is told to discard anything an
interrupted process logged after the checkpoint it resumes from (those steps are logged again, with the same
values), so its curves hold one point per step.

Importing this module is cheap and imports no tracker: the flag check only asks whether the package is
installed, and a tracker's package is imported when its run starts (main process only).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

# The trackers of accelerate.utils.LoggerType (accelerate 1.16; "all" left out: name them) -> the module each
# needs and the pip package that provides it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "comet_ml": ("comet_ml", "comet_ml"), "aim": ("aim", "aim"),
            "mlflow": ("mlflow", "mlflow"), "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive"),
            "swanlab": ("swanlab", "swanlab")}
TENSORBOARD_DIR = "tensorboard"  # inside the run folder: `tensorboard --logdir runs/` shows every run
DVCLIVE_DIR = "dvclive"


def installed(module: str) -> bool:
    """Whether `module` can be imported (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def tracker_name(text: str) -> str:
    """argparse type of --report-to: a tracker Accelerate supports and that is installed, or `none`."""
    if text == "none":
        return text
    if text not in TRACKERS:
        raise argparse.ArgumentTypeError(f"unknown tracker {text!r}; choose none or {', '.join(TRACKERS)}")
    module, package = TRACKERS[text]
    if not installed(module):
        raise argparse.ArgumentTypeError(f"{text} is not installed; pip install {package}")
    return text


def chosen(names) -> list[str]:
    """The trackers asked for, each once, without `none`."""
    return [n for n in dict.fromkeys(names or []) if n != "none"]


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> one level of `a/b` keys whose values every tracker accepts (bool, int, float, str)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_config(value, name + "/")
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:  # None, lists, paths: their JSON text
            out[name] = json.dumps(value, default=str)
    return out


def tracker_key(run_id: str) -> str:
    """A tracker-safe run key (40 hex digits: W&B ids, Comet experiment keys) derived from the run id."""
    return hashlib.sha1(run_id.encode()).hexdigest()


def tracker_arguments(name: str, folder: Path, run_id: str, project: str, group: str | None,
                      resume_step: int | None) -> tuple[tuple, dict]:
    """Positional and keyword arguments of Accelerate's tracker class `name` for one run folder. `resume_step`:
    the step of the checkpoint the run resumes from (None: a fresh run)."""
    resumed = resume_step is not None
    if name == "tensorboard":  # purge_step: TensorBoard drops what the interrupted process logged after it
        return (TENSORBOARD_DIR, str(folder)), {"purge_step": resume_step + 1 if resumed else None}
    if name == "wandb":
        return (project,), {"name": run_id, "id": tracker_key(run_id), "resume": "allow", "group": group}
    if name == "trackio":  # trackio resumes a run by its name
        return (project,), {"name": run_id, "resume": "allow", "group": group}
    if name == "comet_ml":
        return (project,), {"experiment_key": tracker_key(run_id), "mode": "get_or_create"}
    if name == "aim":
        return (run_id, str(folder)), {}
    if name == "mlflow":
        return (), {"experiment_name": project, "run_name": run_id, "tags": {"run_folder": str(folder)}}
    if name == "clearml":
        return (run_id,), {"project_name": project, "task_name": run_id, "continue_last_task": resumed}
    if name == "dvclive":
        return (None,), {"dir": str(folder / DVCLIVE_DIR), "resume": resumed}
    if name == "swanlab":
        return (project,), {"experiment_name": run_id}
    raise ValueError(name)


class RunTracker:
    """The --report-to trackers of one run folder. `log` takes what MetricLog records; `finish` closes them.
    Build it on the main process only (others log nothing)."""

    def __init__(self, names, folder: Path, run_id: str, config: dict, project: str = "random-teachers",
                 group: str | None = None, resume_step: int | None = None):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        hyperparameters = flat_config(config)
        if resume_step is None and "tensorboard" in chosen(names):
            # a fresh run: events left by an attempt that never reached a checkpoint are redone, not kept twice
            shutil.rmtree(Path(folder) / TENSORBOARD_DIR, ignore_errors=True)
        for name in chosen(names):
            args, kwargs = tracker_arguments(name, Path(folder), run_id, project, group, resume_step)
            tracker = LOGGER_TYPE_TO_CLASS[name](*args, **{k: v for k, v in kwargs.items() if v is not None})
            tracker.start()
            tracker.store_init_configuration(hyperparameters)
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_tracker(args, folder: Path, run_id: str, config: dict, is_main: bool, group: str | None = None,
                 resume_step: int | None = None) -> RunTracker | None:
    """The run folder's RunTracker, or None when nothing is to be reported (no --report-to, or not the main
    process)."""
    if not is_main or not chosen(getattr(args, "report_to", None)):
        return None
    return RunTracker(args.report_to, folder, run_id, config, args.tracker_project, group, resume_step)
