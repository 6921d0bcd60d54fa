"""From a grid's finished run folders (local, or pushed to a Hub repo) to its table and figure: mean ± std over
seeds, the paper's numbers beside them where the grid file gives them."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from utils.grids import Point, run_dir, same_arguments  # noqa: E402
from utils.results import markdown_table, read_config, write_table  # noqa: E402


def collect(spec: dict, pts: list[Point], runs: Path | None = None, hub_folder: Path | None = None) -> pd.DataFrame:
    """One row per (point, subject, probe): the swept values, seed, best and final test accuracy (%), and for
    transfer grids the probed dataset. Local run folders by name; a Hub snapshot by matching each pushed run's
    config.json against the points' arguments (its folders are named by run id)."""
    found = []  # (point, folder)
    if hub_folder is not None:
        for config_path in sorted(Path(hub_folder).glob("runs/*/config.json")):
            config = json.loads(config_path.read_text())
            found += [(p, config_path.parent) for p in pts if same_arguments(p, config)]
    else:
        found = [(p, run_dir(runs, spec, p)) for p in pts]
    rows = []
    for point, folder in found:
        if not (folder / "summary.json").exists() or not same_arguments(point, read_config(folder) or {}):
            continue
        base = point.swept | {"seed": point.args.get("seed", 0), "point": point.name, "probed_on": "-"}
        summary = json.loads((folder / "summary.json").read_text())["probes"]
        for subject, probes in summary.items():
            for probe, entry in probes.items():
                rows.append(base | {"subject": subject, "probe": probe, "best": 100 * entry["best"],
                                    "final": 100 * entry["final"]})
        for results in sorted(folder.glob("probes/*/probe_results.json")):
            saved = json.loads(results.read_text())
            for metric, value in saved["results"].items():
                subject, probe, split = metric.split("/")
                if split == "test":
                    rows.append(base | {"subject": subject, "probe": probe, "best": 100 * value,
                                        "final": 100 * value, "probed_on": Path(saved["dataset"]).name})
    return pd.DataFrame(rows)


def mean_std(df: pd.DataFrame, by: list[str], value: str = "best") -> pd.DataFrame:
    grouped = df.groupby(by, sort=False)[value]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0), "seeds": grouped.size()})


def _pm(stats: pd.DataFrame) -> pd.Series:
    return stats.apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1)


def report(spec: dict, df: pd.DataFrame, out: Path, curves: pd.DataFrame | None = None) -> Path:
    """Write <out>/report.md, report.csv and report.png for the grid's report kind; return the markdown path."""
    cfg = spec["report"]
    out.mkdir(parents=True, exist_ok=True)
    probe = cfg.get("probe", "linear")
    kind = cfg["kind"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if kind == "table":
        groups = cfg.get("rows", ["dataset", "model"])
        own = df[(df.probe == probe) & (df.probed_on == "-")]
        stats = mean_std(own, groups + ["subject"])
        table = _pm(stats).unstack("subject").reindex(columns=[s for s in ("teacher", "student", "input")
                                                               if s in set(own.subject)])
        paper = cfg.get("paper", {})
        for subject in ("teacher", "student", "input"):
            table[f"paper {subject}"] = [paper.get("/".join(map(str, key if isinstance(key, tuple) else (key,))),
                                                   {}).get(subject, "") for key in table.index]
        means = stats["mean"].unstack("subject")
        means.plot.bar(ax=ax, yerr=stats["std"].unstack("subject"), rot=0)
        ax.set_ylabel(f"{probe} probe accuracy (%)")
    elif kind == "transfer":
        moved = df[(df.probe == probe) & (df.probed_on != "-")]
        stats = mean_std(moved, cfg.get("rows", ["dataset", "model"]) + ["probed_on", "subject"], "final")
        table = _pm(stats).unstack(["probed_on", "subject"])
        stats["mean"].unstack(["probed_on", "subject"]).plot.bar(ax=ax, rot=0)
        ax.set_ylabel(f"{probe} probe accuracy (%) after transfer")
    elif kind == "sweep":
        x, hue = cfg["x"], cfg.get("hue")
        own = df[(df.probe == probe) & (df.probed_on == "-")]
        keys = [hue, x] if hue else [x]
        student = mean_std(own[own.subject == "student"], keys)
        teacher = mean_std(own[own.subject == "teacher"], keys)
        table = pd.DataFrame({"student": _pm(student), "teacher": _pm(teacher)})
        order = list(dict.fromkeys(student.index.get_level_values(x)))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in order)
        for label, frame in (student.groupby(level=0, sort=False) if hue else [(None, student)]):
            values = list(frame.index.get_level_values(x))
            xs = values if numeric else [order.index(v) for v in values]  # categories at 0, 1, 2, ...
            ax.errorbar(xs, frame["mean"], yerr=frame["std"], marker="o", capsize=3,
                        label=f"student, {hue}={label}" if hue else "student")
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order], fontsize=8)
        teacher_mean = teacher["mean"].groupby(level=0).mean() if hue else pd.Series({"": teacher["mean"].mean()})
        for label, value in teacher_mean.items():
            ax.axhline(value, ls="--", lw=1, color="grey")
        ax.plot([], [], ls="--", color="grey", label="teacher")
        if cfg.get("logx") and numeric:
            ax.set_xscale("symlog", linthresh=cfg.get("linthresh", 1e-10)) if cfg.get("symlog") else ax.set_xscale("log")
        ax.set_xlabel(cfg.get("xlabel", x))
        ax.set_ylabel(f"best {probe} probe accuracy (%)")
        ax.legend(fontsize=8)
    elif kind == "curve":
        wanted = curves[curves.metric.isin([f"{s}/{probe}/test" for s in ("student", "teacher", "input")])]
        stats = wanted.groupby(["metric", "epoch"]).value.agg(["mean", "std"]).mul(100).fillna(0)
        table = _pm(stats).unstack("metric")
        for metric, frame in stats.groupby(level=0):
            epochs = frame.index.get_level_values("epoch")
            subject = metric.split("/")[0]
            if subject == "student":
                ax.plot(epochs, frame["mean"], marker="o", label="student")
                ax.fill_between(epochs, frame["mean"] - frame["std"], frame["mean"] + frame["std"], alpha=0.25)
            else:
                ax.axhline(frame["mean"].iloc[0], ls="--" if subject == "input" else "-", color="grey",
                           lw=1, label=subject)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{probe} probe accuracy (%)")
        ax.legend(fontsize=8)
    else:
        raise ValueError(f"unknown report kind {kind!r}")
    ax.set_title(cfg.get("title", spec["name"]), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)
    write_table(out / "report.csv", table.reset_index())
    shown = table.copy()
    if isinstance(shown.index, pd.MultiIndex):  # "model=vgg11, alpha=0.01" instead of a tuple
        shown.index = [", ".join(f"{n}={v}" for n, v in zip(shown.index.names, key)) for key in shown.index]
    if isinstance(shown.columns, pd.MultiIndex):  # transfers: "digits: student"
        shown.columns = [": ".join(map(str, key)) for key in shown.columns]
    md = out / "report.md"
    md.write_text(f"# {cfg.get('title', spec['name'])}\n\n{markdown_table(shown)}\n\n"
                  f"{len(df.point.unique()) if len(df) else 0} finished points; mean ± std over seeds "
                  f"({probe} probe, " + {"curve": "per epoch", "transfer": "after transfer"}.get(kind, "best epoch") + ").\n")
    return md


def collect_curves(spec: dict, pts: list[Point], runs: Path) -> pd.DataFrame:
    """metrics.csv of every finished point, for probe-vs-epoch figures."""
    frames = []
    for point in pts:
        folder = run_dir(runs, spec, point)
        if (folder / "summary.json").exists():
            frames.append(pd.read_csv(folder / "metrics.csv").assign(point=point.name))
    return pd.concat(frames) if frames else pd.DataFrame(columns=["epoch", "step", "metric", "value", "point"])
