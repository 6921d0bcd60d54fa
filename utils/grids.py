"""Experiment grids: one YAML file per table or figure under accelerate_configs/experiments/, expanded into
points, each one train_distill.py run folder with a stable name (and optional probe.py transfers into it).

A grid file holds `fixed` arguments, a `grid` of swept ones (the cartesian product, in file order, is the list
of points; point i is always the same run), a `report` section for the aggregation, and a `tiny` section that
replaces `fixed` / `grid` keys for the version that runs on 2 CPU cores on the built-in digits.
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

# Derived cost anchors (shared/research/performance.md): fwd + bwd FLOPs per 32 x 32 image, and a realistic
# sustained rate (~25 % of an A100's dense bf16 peak, the best public ResNet18 CIFAR rate). Derived, not measured.
FLOP_PER_IMAGE = {"resnet18": 231e12 / 50_000, "vgg11": 69.9e12 / 50_000, "flatten": 0.1e12 / 50_000}
SUSTAINED_FLOPS = 77e12
TRAIN_IMAGES = {"cifar10": (50_000, 32), "cifar100": (50_000, 32), "stl10": (5_000, 96),
                "tinyimagenet": (100_000, 64), "digits": (5_000, 32), "photos": (5_000, 32)}


@dataclass(frozen=True)
class Point:
    index: int
    name: str            # stable folder name: the swept values, e.g. model-vgg11_alpha-0.01_seed-0
    args: dict           # every train_distill.py argument of this point (flag name without dashes -> value)
    swept: dict          # the swept subset of args
    probe_on: tuple      # datasets to probe the student on afterwards (transfer tables)


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
        # the full grid's dataset and model do not apply: keep the title's first part
        spec["report"]["title"] = spec["report"].get("title", name).split(" (")[0] + " [--tiny CPU proxy]"
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
        out.append(Point(i, name, spec.get("fixed", {}) | swept, swept, tuple(spec.get("probe_on", []))))
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
    """The train_distill.py command of a point, then one probe.py command per transfer dataset."""
    launch = launcher or [sys.executable]
    cmds = [[*launch, "train_distill.py", *as_flags(point.args), "--output-dir", str(folder)]]
    for dataset in point.probe_on:
        cmds.append([*launch, "probe.py", "--student", str(folder), "--dataset", dataset])
    return cmds


def same_arguments(point: Point, config: dict) -> bool:
    return all(config.get(k) == v for k, v in point.args.items())


def finished(point: Point, folder: Path) -> bool:
    """The point's run (of exactly its arguments) and its transfer probes are done."""
    names = [Path(d).name for d in point.probe_on]
    if not (folder / "summary.json").exists() or not same_arguments(point, read_config(folder) or {}):
        return False
    return all((folder / "probes" / n / "probe_results.json").exists() for n in names)


def gpu_hours(point: Point) -> float:
    """Derived cost of one point on an A100-class GPU (FLOP count / sustained rate; probing not counted)."""
    n, size = TRAIN_IMAGES.get(point.args.get("dataset", "cifar10"), (50_000, 32))
    n = min(n, point.args.get("train_subset") or n)
    flop = FLOP_PER_IMAGE[point.args.get("model", "resnet18")] * (size / 32) ** 2 * point.args.get("width", 1) ** 2
    return flop * n * point.args.get("epochs", 150) / SUSTAINED_FLOPS / 3600


def shell(cmd: list[str]) -> str:
    return shlex.join(cmd)
