"""Experiment grids: one YAML file per table or figure under accelerate_configs/experiments/, expanded into
points, each one run folder with a stable name (a train_distill.py run, plus optional probe.py transfers into it).

A grid file holds `fixed` arguments, a `grid` of swept ones (the cartesian product, in file order, is the list
of points; point i is always the same run), a `report` section for the aggregation, and a `tiny` section that
replaces `fixed` / `grid` keys for the version that runs on 2 CPU cores on the built-in digits. An optional
`script` key names the script every point runs (default train_distill.py; its flags are the point's arguments).

Repetitions: a grid sweeps `repeat` (train_distill.py --repeat R), which draws a new random teacher, a new fresh
init for the student, a new data order and a new probe seed together (utils.cli.repetition_seeds), so a
report's mean +- std is over random teachers, as the paper's "three runs" (§3, "Probing").
"""
from __future__ import annotations

import itertools
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from utils.cli import UsageError
from utils.results import read_config

GRID_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs" / "experiments"
DEFAULT_SCRIPT = "train_distill.py"
# What marks a point's run folder as finished, per script (a later grid of another script names its own).
FINISHED_MARK = {"train_distill.py": "summary.json"}


@dataclass(frozen=True)
class Point:
    index: int
    name: str            # stable folder name: the swept values, e.g. model-vgg11_alpha-0.01_repeat-0
    args: dict           # every argument of this point's script (flag name without dashes -> value)
    swept: dict          # the swept subset of args
    probe_on: tuple      # datasets to probe the student on afterwards (transfer tables)
    script: str = DEFAULT_SCRIPT


def available() -> list[str]:
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def load_grid(name: str, tiny: bool = False) -> dict:
    path = GRID_DIR / f"{name}.yaml"
    if not path.exists():
        raise UsageError("grid", f"no grid {name!r} (have: {', '.join(available())})")
    spec = yaml.safe_load(path.read_text())
    if tiny:
        small = spec.get("tiny") or {}
        spec = spec | {"fixed": spec.get("fixed", {}) | small.get("fixed", {}),
                       "grid": spec.get("grid", {}) | small.get("grid", {}),
                       "probe_on": small.get("probe_on", spec.get("probe_on", [])),
                       "report": spec["report"] | small.get("report", {})}
        # the full grid's dataset and model do not apply: keep the title's first part, and no paper number is
        # set beside (or drawn onto) a CPU proxy's results on other data
        spec["report"]["title"] = spec["report"].get("title", name).split(" (")[0] + " [--tiny CPU proxy]"
        spec["report"]["paper"] = small.get("report", {}).get("paper", {})
    spec["name"] = name + ("-tiny" if tiny else "")
    spec["folder"] = spec.get("runs_of", name) + ("-tiny" if tiny else "")  # grids can share runs (Tables 1, 3)
    return spec


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else "+".join(map(str, value)) if isinstance(value, list) \
        else str(value)


def _folder_text(value) -> str:
    return _text(value).replace("/", ".")  # bottleneck strings hold slashes


def points(spec: dict) -> list[Point]:
    keys = list(spec.get("grid", {}))
    values = [spec["grid"][k] for k in keys]
    out = []
    for i, combo in enumerate(itertools.product(*values)):
        swept = dict(zip(keys, combo))
        name = "_".join(f"{k}-{_folder_text(v)}" for k, v in swept.items()) or "run"
        out.append(Point(i, name, spec.get("fixed", {}) | swept, swept, tuple(spec.get("probe_on", [])),
                         spec.get("script", DEFAULT_SCRIPT)))
    return out


def run_dir(runs: Path, spec: dict, point: Point) -> Path:
    return Path(runs) / spec["folder"] / point.name


def as_flags(args: dict) -> list[str]:
    """{key: value} -> command-line flags: True is a bare flag, False/None is left out, a list gives values."""
    flags = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [flag, *map(_text, value)]
        else:
            flags.append(f"{flag}={_text(value)}")  # `=`: a value may start with '-' (bottleneck strings)
    return flags


def commands(point: Point, folder: Path, launcher: list[str] | None = None) -> list[list[str]]:
    """The command of a point (its script, train_distill.py by default), then one probe.py command per transfer
    dataset."""
    launch = launcher or [sys.executable]
    cmds = [[*launch, point.script, *as_flags(point.args), "--output-dir", str(folder)]]
    for dataset in point.probe_on:
        cmds.append([*launch, "probe.py", "--student", str(folder), "--dataset", dataset])
    return cmds


def same_arguments(point: Point, config: dict) -> bool:
    return all(config.get(k) == v for k, v in point.args.items())


def finished(point: Point, folder: Path) -> bool:
    """The point's run (of exactly its arguments) and its transfer probes are done."""
    names = [Path(d).name for d in point.probe_on]
    mark = FINISHED_MARK.get(point.script, "summary.json")
    if not (folder / mark).exists() or not same_arguments(point, read_config(folder) or {}):
        return False
    return all((folder / "probes" / n / "probe_results.json").exists() for n in names)


def shell(cmd: list[str]) -> str:
    return shlex.join(cmd)
