#!/usr/bin/env python
"""Tables and figures of README "Does it reproduce the paper?" from the fidelity run folders.

    python benchmarks/fidelity_report.py                      # runs/fidelity/* -> docs/fidelity_*.png + tables
    python benchmarks/fidelity_report.py --runs runs/gpu --prefix gpu

Reads every run folder's metrics.csv (finished or still running) and config.json; prints markdown tables:
the main runs (teacher / student best and final / input, linear and k-NN, raw and standardised), and each
variant run against its main run at the same epoch. Writes <docs>/<prefix>_probes.png (probe accuracy vs step,
one panel per model x dataset) and <docs>/<prefix>_dynamics.png (KL, embedding norm, distance to the teacher,
share of Adam's step damped by eps, vs step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from utils.results import atomic_path, markdown_table  # noqa: E402

PROBES = ("linear", "knn", "linear_std", "knn_std")
DYNAMICS = ("train/kl", "train/embedding_norm", "train/param_distance", "train/eps_damped")


def load(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    metrics = pd.read_csv(run / "metrics.csv")
    return {"name": run.name, "config": config, "metrics": metrics, "finished": (run / "summary.json").exists(),
            "steps": int(metrics.step.max()), "wall_s": config.get("wall_time_s")}


def probe_curve(metrics: pd.DataFrame, subject: str, probe: str) -> pd.DataFrame:
    rows = metrics[metrics.metric == f"{subject}/{probe}/test"].sort_values("step")
    return rows[["epoch", "step", "value"]]


def main_row(run: dict) -> dict:
    m, cfg = run["metrics"], run["config"]
    row = {"run": run["name"], "steps": run["steps"],
           "status": f"finished, {run['wall_s'] / 60:.0f} min" if run["finished"] else "running"}
    for probe in PROBES:
        student = probe_curve(m, "student", probe)
        trained = student[student.epoch > 0]
        row[f"{probe}: teacher"] = 100 * probe_curve(m, "teacher", probe).value.mean()
        row[f"{probe}: student best"] = 100 * trained.value.max() if len(trained) else float("nan")
        row[f"{probe}: student final"] = 100 * student.value.iloc[-1]
        row[f"{probe}: input"] = 100 * probe_curve(m, "input", probe).value.mean()
    return row


def at_epoch(run: dict, epoch: int) -> dict:
    """The student's k-NN and standardised linear accuracy (%) at the probe of `epoch`, and that probe's step."""
    out = {"step": None}
    for probe in ("knn", "linear_std"):
        curve = probe_curve(run["metrics"], "student", probe)
        hit = curve[curve.epoch == epoch]
        out[probe] = 100 * hit.value.iloc[0] if len(hit) else float("nan")
        out["step"] = int(hit.step.iloc[0]) if len(hit) else out["step"]
    return out


def plot_probes(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["config"]["model"] for r in runs})
    datasets = sorted({r["config"]["dataset"] for r in runs})
    fig, axes = plt.subplots(len(models), len(datasets), figsize=(5 * len(datasets), 3.6 * len(models)),
                             squeeze=False)
    for run in runs:
        cfg = run["config"]
        ax = axes[models.index(cfg["model"])][datasets.index(cfg["dataset"])]
        for probe, color in (("knn", "C1"), ("linear_std", "C2")):
            label = "k-NN" if probe == "knn" else "linear (standardised)"
            s = probe_curve(run["metrics"], "student", probe)
            ax.plot(s.step, 100 * s.value, "-", color=color, label=f"student, {label}")
            ax.axhline(100 * probe_curve(run["metrics"], "teacher", probe).value.mean(), color=color, ls="--",
                       lw=1, label=f"teacher, {label}")
            ax.axhline(100 * probe_curve(run["metrics"], "input", probe).value.mean(), color=color, ls=":",
                       lw=1, label=f"pixels, {label}")
        ax.set(title=f"{cfg['model']} on {cfg['dataset']} (width {cfg.get('width', 1):g}, batch {cfg['batch_size']})",
               xlabel="step", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        if not ax.has_data():  # a model x dataset pair with no run in the folder: say so rather than draw empty axes
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no run in this folder", ha="center", va="center", transform=ax.transAxes)
    next(ax for ax in axes.flat if ax.has_data()).legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_dynamics(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DYNAMICS), figsize=(4.2 * len(DYNAMICS), 3.3))
    for ax, metric in zip(axes, DYNAMICS):
        for i, run in enumerate(runs):
            rows = run["metrics"][run["metrics"].metric == metric].sort_values("step")
            ax.plot(rows.step, rows.value, color=f"C{i}", lw=1, label=run["name"])
        ax.set(title=metric, xlabel="step", yscale="log" if metric != "train/eps_damped" else "linear")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def fmt(df: pd.DataFrame) -> str:
    return markdown_table(df.set_index(df.columns[0]), digits=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/fidelity", help="folder holding the run folders")
    p.add_argument("--docs", default="docs", help="where the figures go")
    p.add_argument("--prefix", default="fidelity", help="file-name prefix of the figures")
    p.add_argument("--at-epoch", type=int, help="compare the variants at this epoch (default: each one's last)")
    args = p.parse_args(argv)
    if not Path(args.runs).is_dir():
        sys.exit(f"error: argument --runs: {args.runs} is not a folder")
    runs = [load(d) for d in sorted(Path(args.runs).iterdir()) if (d / "metrics.csv").exists()]
    if not runs:
        sys.exit(f"error: no run folders with a metrics.csv under {args.runs}")
    def key(r):
        return r["config"]["model"], r["config"]["dataset"]

    mains = [r for r in runs if r["name"] == "-".join(key(r))]  # runs/fidelity/<model>-<dataset>
    variants = [r for r in runs if r not in mains and any(key(m) == key(r) for m in mains)]
    rows = [r for r in runs if r not in variants]  # a folder with no main run of its kind gets its own row
    table = pd.DataFrame([main_row(r) for r in rows])
    for probe in PROBES:
        print(f"\n### {probe} probe (%)\n")
        cols = ["run", "steps", "status"] + [c for c in table.columns if c.startswith(f"{probe}:")]
        print(fmt(table[cols].rename(columns=lambda c: c.split(": ")[-1])))
    if variants:
        compared = []
        for run in variants:
            main = next(m for m in mains if key(m) == key(run))
            epoch = args.at_epoch or int(run["metrics"].epoch.max())
            mine, ref = at_epoch(run, epoch), at_epoch(main, epoch)
            compared.append({"run": run["name"], "epoch": epoch, "step": str(mine["step"] or "-"),
                         "k-NN": mine["knn"], "main run k-NN": ref.get("knn"),
                         "linear (std)": mine["linear_std"], "main run linear (std)": ref.get("linear_std"),
                         "teacher k-NN": 100 * probe_curve(run["metrics"], "teacher", "knn").value.mean(),
                         "teacher linear (std)": 100 * probe_curve(run["metrics"], "teacher", "linear_std").value.mean()})
        print("\n### variants: the student at one epoch, beside the main run's student at the same epoch (%)\n")
        print(fmt(pd.DataFrame(compared)))
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    figures = [docs / f"{args.prefix}_dynamics.png"]
    plot_dynamics(rows, figures[0])
    if mains:
        figures.append(docs / f"{args.prefix}_probes.png")
        plot_probes(mains, figures[1])
    print("\nfigures: " + ", ".join(map(str, figures)))


if __name__ == "__main__":
    main()
