"""Run folders, atomic writes, tidy metric tables, summaries, the probe table and the probe-vs-epoch figure."""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pandas as pd

from utils.cli import write_failure

SUBJECTS = ("input", "teacher", "student")
PROBES = ("linear", "knn", "linear_std", "knn_std")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds. A write that fails
    (disk full, read-only) is re-raised as an OSError naming `path`, whatever the writer raised: torch.save's
    RuntimeError or an OSError without a file name would not say which file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise write_failure(err, path) or err from None
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except Exception as err:
        failure = write_failure(err, path)
        if failure is None or failure is err:
            raise
        raise failure from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path, df: pd.DataFrame, **to_csv) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **to_csv)


# What a run folder holds, in the order a discarded run loses it: summary.json (the "finished" mark) first,
# config.json (what checkpoints are checked against) last, so a crash mid-way leaves nothing that looks whole.
RUN_CONTENTS = ("summary.json", "student", "probe_table.csv", "probe_accuracy.png", "probes", "metrics.csv",
                "tensorboard", "dvclive", "checkpoints", "config.json")


def read_json(path) -> dict | list | None:
    """A JSON file's contents, or None if it is missing or unreadable (a file edited or truncated by hand)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_config(folder: Path) -> dict | None:
    """A run folder's config.json, or None if it is missing or unreadable."""
    return read_json(Path(folder) / "config.json")


def discard_run(folder: Path, only: tuple[str, ...] = RUN_CONTENTS) -> None:
    """Delete a run's own files and folders from `folder` (never anything else the folder holds)."""
    for name in RUN_CONTENTS:
        path = Path(folder) / name
        if name not in only or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def environment() -> dict:
    versions = {}
    for pkg in ("torch", "torchvision", "accelerate", "datasets", "huggingface-hub"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent)
        sha = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"python": platform.python_version(), "versions": versions, "git_sha": sha}


class MetricLog:
    """Tidy metrics: one row per (epoch, step, metric). Rewritten atomically to metrics.csv on `flush`. With a
    `tracker` (utils.tracking.RunTracker) every row is also logged there as it is recorded, at its step."""

    def __init__(self, path, tracker=None):
        self.path, self.rows, self.tracker = Path(path), [], tracker

    def log(self, epoch: int, step: int, values: dict) -> None:
        values = {k: float(v) for k, v in values.items()}
        self.rows += [{"epoch": epoch, "step": step, "metric": k, "value": v} for k, v in values.items()]
        if self.tracker is not None:
            self.tracker.log(values, step)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["epoch", "step", "metric", "value"])

    def flush(self) -> None:
        write_table(self.path, self.frame(), na_rep="nan")  # a non-finite value is written, never a blank cell


def summarize(df: pd.DataFrame) -> dict:
    """Best (max over probed epochs after init, as the paper reports) and final test accuracy per subject and
    probe; with a validation split also the test accuracy at the epoch that is best on validation."""
    out: dict = {}
    for subject in SUBJECTS:
        for probe in PROBES:
            test = df[df.metric == f"{subject}/{probe}/test"].sort_values("epoch")
            if test.empty:
                continue
            after_init = test[test.epoch > 0] if subject == "student" else test
            entry = {"final": test.value.iloc[-1], "init": test.value.iloc[0] if subject == "student" else None,
                     "best": after_init.value.max() if len(after_init) else math.nan,
                     "best_epoch": int(after_init.epoch.iloc[after_init.value.argmax()]) if len(after_init) else None}
            val = df[df.metric == f"{subject}/{probe}/val"].sort_values("epoch")
            val = val[val.epoch > 0] if subject == "student" else val
            if len(val):
                epoch = int(val.epoch.iloc[val.value.argmax()])
                entry["val_selected_epoch"] = epoch
                entry["test_at_best_val"] = test[test.epoch == epoch].value.iloc[0]
            out.setdefault(subject, {})[probe] = entry
    return out


def probe_table(summary: dict) -> pd.DataFrame:
    """Subjects as rows; `<probe> best` / `<probe> final` columns in percent."""
    rows = []
    for subject in SUBJECTS:
        if subject not in summary:
            continue
        row = {"subject": subject}
        for probe, entry in summary[subject].items():
            row[f"{probe} best"] = 100 * entry["best"]
            row[f"{probe} final"] = 100 * entry["final"]
            if "test_at_best_val" in entry:
                row[f"{probe} @val"] = 100 * entry["test_at_best_val"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("subject")


def markdown_table(table: pd.DataFrame, digits: int = 2) -> str:
    """A markdown table with the index as first column; floats to `digits` places, NaN as '-'."""
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cells = [[table.index.name or ""] + list(map(str, table.columns))]
    cells += [[str(i)] + [cell(v) for v in row] for i, row in zip(table.index, table.astype(object).to_numpy())]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines[:1] + ["|" + "---|" * len(cells[0])] + lines[1:])


def probe_line(epoch: int, step: int, values: dict) -> str:
    """One console line for the probes of one epoch: `epoch 3, step 12 | student linear 45.31 % knn 40.10 % |
    ...` (test accuracies; val ones follow in brackets)."""
    parts = []
    for subject in SUBJECTS:
        own = [(probe, values[f"{subject}/{probe}/test"]) for probe in PROBES if f"{subject}/{probe}/test" in values]
        if own:
            parts.append(f"{subject} " + " ".join(
                f"{probe} {100 * v:.2f} %" + (f" (val {100 * values[f'{subject}/{probe}/val']:.2f} %)"
                                              if f"{subject}/{probe}/val" in values else "") for probe, v in own))
    return f"epoch {epoch}, step {step} | " + " | ".join(parts)


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:6.2f}", na_rep="   -")


def plot_probes(df: pd.DataFrame, path, title: str = "") -> None:
    """Probe accuracy vs epoch like the paper's Fig. 1: student line, teacher level, input dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    probes = [p for p in PROBES if (df.metric == f"student/{p}/test").any()]
    cols = min(len(probes), 2)
    rows = math.ceil(len(probes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax, probe in zip(axes.flat, probes):
        student = df[df.metric == f"student/{probe}/test"].sort_values("epoch")
        ax.plot(student.epoch, 100 * student.value, "o-", color="C1", label="student")
        for subject, style, color in (("teacher", "-", "C0"), ("input", "--", "k")):
            level = df[df.metric == f"{subject}/{probe}/test"].value
            if len(level):
                ax.axhline(100 * level.mean(), linestyle=style, color=color, label=subject)
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{probe.replace('_', ' ')} probe")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
