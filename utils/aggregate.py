"""From a grid's finished run folders (local, or pushed to a Hub repo) to its table and figure: mean ± std over
the repetitions of each cell (each repetition has its own random teacher, see utils.cli.repetition_seeds), the
number of repetitions n, and the paper's numbers beside them where the grid file gives them.

report.csv is data: one row per cell, numeric `<subject> mean`, `<subject> std` and `<subject> n` columns and
`paper <subject>` columns. report.md shows the same cells as `mean ± std` (just `mean` when n = 1).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from utils.choices import BOTTLENECK_PRESETS  # noqa: E402
from utils.cli import UsageError  # noqa: E402
from utils.grids import Point, finished, run_dir, same_arguments  # noqa: E402
from utils.results import markdown_table, read_config, write_table  # noqa: E402

SUBJECTS = ("teacher", "student", "input")
SEED_KEYS = ("teacher_seed", "student_seed", "seed", "probe_seed")
# The setting of the official code, which produced every number the paper prints: its weight normalisation of
# the last layer was a no-op (head -/lb/fn/-/l/-) and AdamW decayed biases and norm parameters by 0.01.
PAPER_SETTING = "head official -/lb/fn/-/l/-, bias decay 0.01"
STD_NOTE = ("n: finished repetitions of the cell, each with its own random teacher, student init, data order and "
            "probe seed (`--repeat`); ± is their sample standard deviation (n - 1 in the denominator); one "
            "repetition shows no ±.")


def head_of(args: dict) -> str:
    """The head and bias decay a run used, e.g. `default -/lb/fn/wn/l/-, bias decay 0`."""
    name = args.get("bottleneck", "default")
    spec = BOTTLENECK_PRESETS.get(name, name)
    return (f"{name} {spec}" if spec != name else spec) + f", bias decay {args.get('bias_weight_decay', 0.0):g}"


def collect(spec: dict, pts: list[Point], runs: Path | None = None, hub_folder: Path | None = None) -> pd.DataFrame:
    """One row per (point, subject, probe): the point's arguments, the repetition and the effective seeds it ran with,
    the head, best and final test accuracy (%), and for transfer grids the probed dataset. Local run folders by
    name; a Hub snapshot by matching each pushed run's config.json against the points' arguments (its folders
    are named by run id)."""
    found = []  # (point, folder)
    if hub_folder is not None:
        for config_path in sorted(Path(hub_folder).glob("runs/*/config.json")):
            config = json.loads(config_path.read_text())
            found += [(p, config_path.parent) for p in pts if same_arguments(p, config)]
    else:
        found = [(p, run_dir(runs, spec, p)) for p in pts]
    rows = []
    for point, folder in found:
        config = read_config(folder) or {}
        if not (folder / "summary.json").exists() or not same_arguments(point, config):
            continue
        scalars = {k: v for k, v in point.args.items() if not isinstance(v, list)}  # fixed ones can be rows too
        base = scalars | point.swept | {"repeat": config.get("repeat", 0), "point": point.name, "probed_on": "-",
                                        "head": head_of(point.args)} | {k: config.get(k) for k in SEED_KEYS}
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


def cell_stats(df: pd.DataFrame, by: list[str], value: str = "best") -> pd.DataFrame:
    """mean, sample std (NaN for one repetition) and n of `value` per group."""
    grouped = df.groupby(by, sort=False)[value]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.size()})


def spread(stats: pd.DataFrame, level: str, keys: list[str]) -> pd.DataFrame:
    """Cells with `level` as columns: `<key> mean`, `<key> std`, `<key> n` for each key, in `keys` order."""
    wide = stats.unstack(level)
    out = pd.DataFrame(index=wide.index)
    for key in keys:
        if ("mean", key) in wide.columns:
            for stat in ("mean", "std", "n"):
                out[f"{key} {stat}"] = wide[(stat, key)].astype("Int64" if stat == "n" else float)
    return out


def shown(mean: float, std: float, n) -> str:
    if n is None or pd.isna(n) or n == 0 or pd.isna(mean):
        return "-"
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def with_paper(table: pd.DataFrame, paper: dict, levels: list[str]) -> pd.DataFrame:
    """Add a numeric `paper <subject>` column per subject the grid file quotes (NaN in rows it gives none for).
    The grid file keys the paper's numbers by the row's values of `levels` joined with '/', e.g.
    `cifar10/resnet18`."""
    index = table.index.to_frame(index=False)
    names = ["/".join(text(row[level]) for level in levels) for _, row in index.iterrows()]
    for subject in SUBJECTS:
        if any(subject in entry for entry in paper.values()):
            table[f"paper {subject}"] = [float(paper.get(name, {}).get(subject, math.nan)) for name in names]
    return table


def markdown_cells(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The report's markdown view: `mean ± std` per key, the paper's number right beside it (where it gives one),
    one `n` column when every key has the same n, and any other (descriptive) columns at the end."""
    md = pd.DataFrame(index=table.index)
    counts = [f"{k} n" for k in keys if f"{k} n" in table]
    same_n = all(table[c].equals(table[counts[0]]) for c in counts)
    present = [k for k in keys if f"{k} mean" in table]
    for i, key in enumerate(present):
        md[key] = [shown(m, s, n) for m, s, n in zip(table[f"{key} mean"], table[f"{key} std"], table[f"{key} n"])]
        if not same_n:
            md[f"{key} n"] = table[f"{key} n"].astype(str).replace("<NA>", "0")
        subject = key.split()[0]  # the paper's number goes beside the last column of its subject
        last = all(k.split()[0] != subject for k in present[i + 1:])
        if last and f"paper {subject}" in table and table[f"paper {subject}"].notna().any():
            md[f"paper {subject}"] = [("-" if pd.isna(v) else f"{v:.2f}") for v in table[f"paper {subject}"]]
    if same_n and counts:
        md["n"] = table[counts[0]].astype(str)
    for column in table.columns:
        if not any(column.startswith(f"{k} ") for k in keys) and not column.startswith("paper "):
            md[column] = table[column]
    if isinstance(md.index, pd.MultiIndex):  # "model=vgg11, alpha=0.01" instead of a tuple
        md.index = [", ".join(f"{n}={v}" for n, v in zip(md.index.names, key)) for key in md.index]
    return md


def heads(df: pd.DataFrame, by: list[str]) -> pd.Series:
    return df.groupby(by, sort=False)["head"].agg(lambda h: "; ".join(sorted(set(h))))


def report(spec: dict, df: pd.DataFrame, out: Path, curves: pd.DataFrame | None = None) -> Path:
    """Write <out>/report.md, report.csv and report.png for the grid's report kind; return the markdown path."""
    cfg = spec["report"]
    out.mkdir(parents=True, exist_ok=True)
    probe, kind, paper = cfg.get("probe", "linear"), cfg["kind"], cfg.get("paper") or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    notes: list[str] = []
    if kind == "table":
        groups = cfg.get("rows", ["dataset", "model"])
        own = df[(df.probe == probe) & (df.probed_on == "-")]
        keys = [s for s in SUBJECTS if s in set(own.subject)]
        stats = cell_stats(own, groups + ["subject"])
        table = with_paper(spread(stats, "subject", keys), paper, cfg.get("paper_keys", groups))
        table["head"] = heads(own, groups)
        plot_bars(ax, table, keys)
        ax.set_ylabel(f"best {probe} probe accuracy (%)")
        notes.append(f"Best epoch of the {probe} probe (the student's maximum over its probed epochs after init).")
    elif kind == "transfer":
        groups = cfg.get("rows", ["dataset", "probed_on", "model"])
        moved = df[(df.probe == probe) & (df.probed_on != "-")]
        keys = [s for s in SUBJECTS if s in set(moved.subject)]
        stats = cell_stats(moved, groups + ["subject"], "final")
        table = with_paper(spread(stats, "subject", keys), paper, cfg.get("paper_keys", ["probed_on", "model"]))
        table["head"] = heads(moved, groups)
        plot_bars(ax, table, keys)
        ax.set_ylabel(f"{probe} probe accuracy (%) after transfer")
        notes.append(f"The {probe} probe of the final student, trained and tested on the dataset it was probed on "
                     "(probe.py); the teacher is the rebuilt random teacher of each run.")
    elif kind == "sweep":
        table, keys = sweep(ax, cfg, df[(df.probe == probe) & (df.probed_on == "-")], paper)
        ax.set_ylabel(f"{probe} probe accuracy (%)")
        values = cfg.get("values", ["best"])
        notes.append(f"{probe} probe; " + " and ".join(
            {"final": "final: after the last epoch", "best": "best: the maximum over probed epochs"}[v]
            for v in values) + "; the teacher is probed once.")
    elif kind == "curve":
        table, keys = curve(ax, cfg, curves, probe)
        notes.append(f"{probe} probe per epoch; teacher and input are probed once per run (solid and dashed levels).")
    else:
        raise ValueError(f"unknown report kind {kind!r}")
    ax.set_title(cfg.get("title", spec["name"]), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120, bbox_inches="tight")  # the legend may sit right of the axes
    plt.close(fig)
    write_table(out / "report.csv", table.reset_index())
    md_table = markdown_cells(table, keys)
    measured = ", ".join(k for k in keys)
    if "head" in md_table and md_table["head"].nunique() == 1:  # one head for all: said once, below the table
        notes.append(f"Measured columns ({measured}): {md_table.pop('head').iloc[0]}.")
    elif "head" in md_table:
        notes.append(f"Measured columns ({measured}): the head and bias decay in each row's `head` column.")
    if paper and any(c.startswith("paper ") for c in md_table.columns):
        notes.append(f"paper columns: the paper's {cfg.get('paper_source', 'numbers')}, produced by the official "
                     f"code ({PAPER_SETTING}).")
    elif cfg.get("paper_source"):
        notes.append(f"No paper number applies to these cells: the paper's numbers ({cfg['paper_source']}) are for "
                     "other data or settings.")
    if cfg.get("note"):
        notes.append(cfg["note"])
    n_points = len(df.point.unique()) if len(df) else 0
    md = out / "report.md"
    md.write_text(f"# {cfg.get('title', spec['name'])}\n\n{markdown_table(md_table)}\n\n{n_points} finished points. "
                  + STD_NOTE + "\n\n" + "\n\n".join(notes) + "\n")
    return md


def plot_bars(ax, table: pd.DataFrame, keys: list[str]) -> None:
    """Grouped bars with std error bars, the paper's numbers as black ticks on the matching bars."""
    labels = [", ".join(map(text, k)) if isinstance(k, tuple) else text(k) for k in table.index]
    width = 0.8 / max(len(keys), 1)
    for j, key in enumerate(keys):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(table))]
        ax.bar(xs, table[f"{key} mean"], width, yerr=table[f"{key} std"].fillna(0), capsize=2, label=key)
        if f"paper {key}" in table and table[f"paper {key}"].notna().any():
            ax.scatter(xs, table[f"paper {key}"], marker="_", s=200, color="k", zorder=3,
                       label="paper" if j == 0 else None)
    ax.set_xticks(range(len(table)), labels, fontsize=7, rotation=20, ha="right")
    ax.legend(fontsize=8)


def sweep(ax, cfg: dict, own: pd.DataFrame, paper: dict) -> tuple[pd.DataFrame, list[str]]:
    """Student (final and/or best) and teacher per swept value and hue. Numbers on a log or linear axis are
    joined by lines; categories (norm layers, bottlenecks) are separate points, never joined."""
    x, hue = cfg["x"], cfg.get("hue")
    by = [hue, x] if hue else [x]
    values = cfg.get("values", ["best"])
    parts = [cell_stats(own[own.subject == "student"], by, v).assign(key=f"student {v}") for v in values]
    parts.append(cell_stats(own[own.subject == "teacher"], by, "best").assign(key="teacher"))
    stats = pd.concat(parts).set_index("key", append=True)
    keys = [f"student {v}" for v in values] + ["teacher"]
    table = with_paper(spread(stats, "key", keys), paper, by)
    order = list(dict.fromkeys(table.index.get_level_values(x)))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in order)
    groups = list(table.groupby(level=0, sort=False)) if hue else [(None, table)]
    for g, (label, frame) in enumerate(groups):
        color = f"C{g}"
        at = list(frame.index.get_level_values(x))
        dodge = 0 if numeric else (g - (len(groups) - 1) / 2) * 0.12
        xs = at if numeric else [order.index(v) + dodge for v in at]
        name = f"{hue}={label}" if hue else ""
        for key in keys:
            marker, line = {"student final": ("o", "-"), "student best": ("s", ":"), "teacher": ("^", "--")}[key]
            # side by side within a category, so error bars do not hide each other
            key_xs = xs if numeric else [x_ + 0.05 * (keys.index(key) - (len(keys) - 1) / 2) for x_ in xs]
            ax.errorbar(key_xs, frame[f"{key} mean"], yerr=frame[f"{key} std"].fillna(0), marker=marker,
                        ls=line if numeric else "none", capsize=3, color=color,
                        mfc="none" if key == "teacher" else color, label=f"{key}, {name}" if hue else key)
        for subject, marker in (("student", "*"), ("teacher", "P")):
            if f"paper {subject}" in frame and frame[f"paper {subject}"].notna().any():
                ax.scatter(xs, frame[f"paper {subject}"], marker=marker, s=120, color=color, edgecolor="k", zorder=3,
                           label=f"paper {subject}, {name}" if hue else f"paper {subject}")
    if not numeric:
        ax.set_xticks(range(len(order)), [str(v) for v in order], fontsize=8)
        ax.set_xlim(-0.5, len(order) - 0.5)
    if cfg.get("logx") and numeric:
        ax.set_xscale("symlog", linthresh=cfg.get("linthresh", 1e-10)) if cfg.get("symlog") else ax.set_xscale("log")
        # ticks at the swept values only: a log axis would label its minor ticks too, on top of each other
        swept = sorted(set(table.index.get_level_values(x)))
        ax.set_xticks(swept, [f"{v:g}" for v in swept], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(cfg.get("xlabel", x))
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return table, keys


def curve(ax, cfg: dict, curves: pd.DataFrame, probe: str) -> tuple[pd.DataFrame, list[str]]:
    """Probe vs epoch, one curve per `hue` value (per model: two models are never averaged into one line)."""
    hue = cfg.get("hue")
    wanted = curves[curves.metric.isin([f"{s}/{probe}/test" for s in SUBJECTS])].assign(
        subject=lambda d: d.metric.str.split("/").str[0], value=lambda d: 100 * d.value)
    by = ([hue] if hue else []) + ["epoch", "subject"]
    stats = cell_stats(wanted, by, "value")
    keys = [s for s in SUBJECTS if s in set(wanted.subject)]
    table = spread(stats, "subject", keys)
    groups = list(table.groupby(level=0, sort=False)) if hue else [(None, table)]
    for g, (label, frame) in enumerate(groups):
        color, name = f"C{g}", f" ({label})" if hue else ""
        student = frame.dropna(subset=["student mean"])
        epochs = student.index.get_level_values("epoch")
        ax.plot(epochs, student["student mean"], marker="o", ms=3, color=color, label=f"student{name}")
        spread_ = student["student std"].fillna(0)
        ax.fill_between(epochs, student["student mean"] - spread_, student["student mean"] + spread_, alpha=0.25,
                        color=color)
        for subject, line in (("teacher", "-"), ("input", "--")):
            if f"{subject} mean" in frame and frame[f"{subject} mean"].notna().any():
                ax.axhline(frame[f"{subject} mean"].dropna().iloc[0], ls=line, lw=1, color=color,
                           label=f"{subject}{name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{probe} probe accuracy (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return table, keys


def collect_curves(spec: dict, pts: list[Point], runs: Path) -> pd.DataFrame:
    """metrics.csv of every finished point (with its swept values), for probe-vs-epoch figures."""
    frames = []
    for point in pts:
        folder = run_dir(runs, spec, point)
        if (folder / "summary.json").exists() and same_arguments(point, read_config(folder) or {}):
            frames.append(pd.read_csv(folder / "metrics.csv").assign(point=point.name, **point.swept))
    return pd.concat(frames) if frames else pd.DataFrame(columns=["epoch", "step", "metric", "value", "point"])


# imp.py / lmc.py / landscape.py grids: each point's own script already aggregates across its students (Fig. 9:
# mean ± std over checkpoints; Fig. 10: over checkpoints x orderings) and draws the paper's figure; the report
# gathers those figures and tables in one place.
FIGURES = {"imp": ("imp.png", "imp_summary.csv"), "lmc": ("lmc.png", "lmc_summary.csv"),
           "landscape": ("landscape.png", None)}
FIGURE_NOTES = {
    "imp": "imp_summary.csv of each point: test accuracy (%) per start, rewind epoch and round (weights remaining), "
           "mean ± sample std over every distilled student (`runs`); best = the best evaluated epoch of the round.",
    "lmc": "lmc_summary.csv of each point: per start, the error (%) at the ends and the maximum along the path and "
           "the barriers, mean ± sample std over every (student, pair of copies); the figure shows error vs γ.",
    "landscape": "landscape.png of each point (the plane through its three networks); landscape.csv holds every "
                 "value drawn."}


def collect_figures(spec: dict, pts: list[Point], runs: Path) -> Path:
    """Copy each finished point's figure to <runs>/<grid>/<point>.png and its summary into report.csv (with a
    `point` column); write report.md listing them. Raises UsageError when no point is finished."""
    kind = spec["report"]["kind"]
    figure, table_name = FIGURES[kind]
    folders = [(p, run_dir(runs, spec, p)) for p in pts]
    done = [(p, folder) for p, folder in folders if finished(p, folder)]
    if not done:
        raise UsageError("grid", f"no finished point of {spec['name']} in {runs}; run it first")
    out = Path(runs) / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    lines, tables = [f"# {spec['report'].get('title', spec['name'])}", ""], []
    for point, folder in done:
        shutil.copyfile(folder / figure, out / f"{point.name}.png")
        lines += [f"## {point.name}", "", f"![{point.name}]({point.name}.png)", "",
                  f"Run folder: `{folder.relative_to(runs)}` under `--runs` (students: "
                  f"{', '.join(name for name, _ in point.inputs)})", ""]
        if table_name:
            table = pd.read_csv(folder / table_name)
            tables.append(table.assign(point=point.name))
            lines += [markdown_table(table.set_index(table.columns[0])), ""]
    if tables:
        write_table(out / "report.csv", pd.concat(tables))
    lines.append(f"{len(done)}/{len(pts)} points finished. {FIGURE_NOTES[kind]}")
    if spec["report"].get("note"):
        lines.append("\n" + spec["report"]["note"])
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
