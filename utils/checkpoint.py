"""Never lose a run: atomic, checksummed Accelerate checkpoints, keep-last-N, and pre-emption signals.

A checkpoint is a folder `checkpoints/step-<global step>` holding Accelerate's state (model, optimiser, RNG
of every process), `run_state.pt` (epoch, position in the epoch's data order, metric rows, ...) and, written
last, `manifest.json` with the SHA-256 of every file. It is built under a temporary name and renamed into
place, so a crash mid-save never leaves a folder that looks complete. Loading walks from the newest
checkpoint back and skips (with a warning) any whose checksums or load fail.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import torch

from utils.cli import write_failure
from utils.fingerprint import file_hash

PREFIX = "step-"
MANIFEST = "manifest.json"
RUN_STATE = "run_state.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def save_checkpoint(accelerator, folder: Path, step: int, run_state: dict, keep: int) -> Path:
    """Save on every process (Accelerate writes per-process RNG files); rename and prune on the main one."""
    folder = Path(folder)
    final, tmp = folder / f"{PREFIX}{step:09d}", folder / f".tmp-{PREFIX}{step:09d}"
    try:
        if accelerator.is_main_process:
            for stale in folder.glob(f".tmp-{PREFIX}*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(run_state, tmp / RUN_STATE)
            manifest = {p.name: file_hash(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except Exception as err:  # disk full mid-save: drop the partial copy, keep the older checkpoints, say where
        failure = write_failure(err, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise OSError(failure.errno, f"{failure.strerror} (checkpoint step {step} not saved; the older "
                                     "checkpoints are kept)", str(folder)) from err
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step (e.g. signal at an epoch end)
        os.replace(tmp, final)
        for newer in list_checkpoints(folder):  # later steps are stale: the run resumed from before them
            if int(newer.name[len(PREFIX):]) > step:
                shutil.rmtree(newer, ignore_errors=True)
        for old in list_checkpoints(folder)[max(keep, 1):]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest, else the reason it does not."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return "no manifest (incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "unreadable manifest"
    for name, digest in manifest.items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file_hash(file) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def load_latest_checkpoint(accelerator, folder: Path) -> dict | None:
    """Restore the newest valid checkpoint into the prepared objects; return its run state (None: none)."""
    for path in list_checkpoints(Path(folder)):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                accelerator.load_state(str(path))
                return torch.load(path / RUN_STATE, weights_only=True) | {"checkpoint": str(path)}
            except Exception as err:  # noqa: BLE001 - any load failure means: try the previous one
                problem = f"loading failed ({type(err).__name__}: {err})"
        warnings.warn(f"skipping checkpoint {path}: {problem}; trying the previous one", stacklevel=2)
    return None


class PreemptionSignal:
    """Remembers SIGTERM / SIGUSR1 (Slurm's pre-emption and time-limit signals) and SIGINT (Ctrl-C) instead of
    dying at once, so the training loop can checkpoint at the next step boundary and exit cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def exit_status(self) -> int:
        """The shell's status for death by the received signal (143 SIGTERM, 138 SIGUSR1, 130 SIGINT)."""
        return 128 + getattr(signal, self.received or "SIGTERM")
