"""Experiment grids: one YAML file per table or figure under accelerate_configs/experiments/, expanded into
points, each one run folder with a stable name (a train_distill.py run, plus optional probe.py transfers into it).

A grid file holds `fixed` arguments, a `grid` of swept ones (the cartesian product, in file order, is the list
of points; point i is always the same run), a `report` section for the aggregation, and a `tiny` section that
replaces `fixed` / `grid` keys for the version that runs on 2 CPU cores on the built-in digits. An optional
`script` key names the script every point runs (default train_distill.py; its flags are the point's arguments).

Grids of imp.py, lmc.py and landscape.py consume the students of a distillation grid: `students_of: {grid: G,
select: {key: value, ...}}` names G's points whose arguments match `select` (all their repetitions). imp.py and
lmc.py points get every selected run as `--student`; a landscape.py grid names students with `as: {name:
{key: value}}` (each must select exactly one run) and sweeps `points: [[name:selector, ...], ...]`. A point
waits until the runs it consumes are finished (see `needs`).

Every grid file is checked against this schema once, when it is loaded: a YAML error, an unknown key (at the top,
in `tiny`, `report` or `students_of`), a value of the wrong type, a swept or fixed key that is not a flag of the
point's script, or a name that is not a plain file name is one line naming the file and the key.

Repetitions: a grid sweeps `repeat` (train_distill.py --repeat R), which draws a new random teacher, a new fresh
init for the student, a new data order and a new probe seed together (utils.cli.repetition_seeds), so a
report's mean +- std is over random teachers, as the paper's "three runs" (§3, "Probing").
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from utils.cli import UsageError
from utils.results import read_config

ROOT = Path(__file__).resolve().parents[1]  # the scripts
GRID_DIR = ROOT / "accelerate_configs" / "experiments"
GRID_DIR_ENV = "REPRODUCE_GRID_DIR"  # another folder of grid files (tests; a user's own grids)
DEFAULT_SCRIPT = "train_distill.py"
# What marks a point's run folder as finished, per script: written once the run's last unit is done.
FINISHED_MARK = {"train_distill.py": "summary.json", "imp.py": "imp_summary.csv", "lmc.py": "lmc_summary.csv",
                 "landscape.py": "landscape.png"}
CONSUMERS = ("imp.py", "lmc.py", "landscape.py")  # scripts whose points consume another grid's students

# The schema: allowed keys and what each holds.
TOP_KEYS = ("script", "students_of", "runs_of", "fixed", "grid", "probe_on", "report", "tiny")
TINY_KEYS = ("students_of", "fixed", "grid", "probe_on", "report")
STUDENTS_KEYS = ("grid", "select", "as")
REPORT_KEYS = ("kind", "title", "probe", "rows", "x", "hue", "values", "xlabel", "logx", "symlog", "linthresh",
               "paper", "paper_keys", "paper_source", "note")
REPORT_KINDS = {"train_distill.py": ("table", "transfer", "sweep", "curve"), "imp.py": ("imp",),
                "lmc.py": ("lmc",), "landscape.py": ("landscape",)}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# arguments the machinery sets itself: a grid never gives them
RESERVED = {"output_dir": "the run folder is set by reproduce.py (--runs)", "overwrite": "reproduce.py never "
            "replaces a run", "student": "students come from `students_of`"}


@dataclass(frozen=True)
class Point:
    index: int
    name: str            # stable folder name: the swept values, e.g. model-vgg11_alpha-0.01_repeat-0
    args: dict           # every argument of this point's script (flag name without dashes -> value)
    swept: dict          # the swept subset of args
    probe_on: tuple      # datasets to probe the student on afterwards (transfer tables)
    script: str = DEFAULT_SCRIPT
    inputs: tuple = ()   # (name, run folder relative to --runs) of each student this point consumes
    needs: tuple = ()    # indices of the points of spec["students_of"]["grid"] it consumes


def grid_dir() -> Path:
    return Path(os.environ.get(GRID_DIR_ENV) or GRID_DIR)


def available() -> list[str]:
    return sorted(p.stem for p in grid_dir().glob("*.yaml"))


def _bad(path: Path, key: str, message: str) -> UsageError:
    return UsageError("grid", f"{path}: {key}: {message}")


@functools.cache
def script_flags(script: str) -> frozenset[str]:
    """The flags (as argument names, `lr_milestones`) a project script accepts: read from the usage line of its
    own parser (its parse_args(["--help"]), output swallowed), so the grids can never drift from the scripts."""
    # by file: `imp` is also the name of a standard-library module
    loader = importlib.util.spec_from_file_location(f"_grid_script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        module.parse_args(["--help"])
    usage = text.getvalue().split("\n\n")[0]
    return frozenset(f.replace("-", "_") for f in re.findall(r"\[--([\w-]+)", usage))


def _check_section(path: Path, where: str, section, allowed: tuple) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise _bad(path, where, f"must be a mapping of keys to values, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise _bad(path, f"{where}.{key}" if where else str(key),
                       f"unknown key (allowed{' in ' + where if where else ''}: {', '.join(allowed)})")
    return section


def _check_arguments(path: Path, where: str, section: dict, script: str) -> None:
    flags = script_flags(script)
    for key, value in section.items():
        if key in RESERVED:
            raise _bad(path, f"{where}.{key}", RESERVED[key])
        if key not in flags:
            raise _bad(path, f"{where}.{key}", f"not a flag of {script} (--{str(key).replace('_', '-')})")
        if where.endswith("grid") and (not isinstance(value, list) or not value):
            raise _bad(path, f"{where}.{key}", f"swept values must be a non-empty list, got {value!r}")


def validate(path: Path, spec) -> dict:
    """Check a grid file's contents against the schema (see the module's docstring); return it unchanged."""
    top = _check_section(path, "", spec, TOP_KEYS)
    if not top.get("report"):
        raise _bad(path, "report", "missing: every grid says how its report aggregates (report: {kind: ...})")
    script = top.get("script", DEFAULT_SCRIPT)
    if script not in REPORT_KINDS:
        raise _bad(path, "script", f"{script!r} is not a script reproduce.py runs ({', '.join(REPORT_KINDS)})")
    tiny = _check_section(path, "tiny", top.get("tiny"), TINY_KEYS)
    for where, section in (("", top), ("tiny.", tiny)):
        report = _check_section(path, where + "report", section.get("report"), REPORT_KEYS)
        if "kind" in report and report["kind"] not in REPORT_KINDS[script]:
            raise _bad(path, where + "report.kind", f"{report['kind']!r} is not a report of {script} grids "
                                                    f"({', '.join(REPORT_KINDS[script])})")
        for name in ("fixed", "grid"):
            _check_arguments(path, where + name, _check_section(path, where + name, section.get(name),
                                                                tuple(section.get(name) or {})), script)
        if not isinstance(section.get("probe_on", []), list):
            raise _bad(path, where + "probe_on", "must be a list of datasets")
        students = _check_section(path, where + "students_of", section.get("students_of"), STUDENTS_KEYS)
        if students and not isinstance(students.get("grid", "" if where else None), str):
            raise _bad(path, where + "students_of.grid", "must name the distillation grid whose runs it consumes")
        for key in ("select", "as"):
            _check_section(path, f"{where}students_of.{key}", students.get(key), tuple(students.get(key) or {}))
    if "kind" not in top["report"]:
        raise _bad(path, "report.kind", f"missing ({', '.join(REPORT_KINDS[script])})")
    if (script in CONSUMERS) != ("students_of" in top):
        raise _bad(path, "students_of", "a grid of imp.py, lmc.py or landscape.py names the grid whose students it "
                                        "consumes, and only such a grid" if script in CONSUMERS else
                   f"only grids of {', '.join(CONSUMERS)} consume students (add script:)")
    if "runs_of" in top and not isinstance(top["runs_of"], str):
        raise _bad(path, "runs_of", "must name the grid whose runs this grid shares")
    return top


def read_grid(name: str) -> tuple[Path, dict]:
    """The grid file's path and its checked contents."""
    if not NAME.fullmatch(name) or ".." in name:
        raise UsageError("grid", f"{name!r} is not a grid name: give a file name of {grid_dir()} without .yaml "
                                 "(no folders, no '..')")
    path = grid_dir() / f"{name}.yaml"
    if not path.exists():
        raise UsageError("grid", f"no grid {name!r} (have: {', '.join(available())})")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise UsageError("grid", f"{path}: {where}: not valid YAML ({getattr(err, 'problem', None) or err})") \
            from None
    return path, validate(path, spec)


def load_grid(name: str, tiny: bool = False) -> dict:
    path, spec = read_grid(name)
    if "runs_of" in spec and spec["runs_of"] not in available():
        raise _bad(path, "runs_of", f"no grid {spec['runs_of']!r}")
    if tiny:
        small = spec.get("tiny") or {}
        spec = spec | {"fixed": (spec.get("fixed") or {}) | (small.get("fixed") or {}),
                       "grid": (spec.get("grid") or {}) | (small.get("grid") or {}),
                       "probe_on": small.get("probe_on", spec.get("probe_on", [])),
                       "students_of": (spec.get("students_of") or {}) | (small.get("students_of") or {}),
                       "report": spec["report"] | (small.get("report") or {})}
        if not spec["students_of"]:
            del spec["students_of"]
        # the full grid's dataset and model do not apply: keep the title's first part, and no paper number is
        # set beside (or drawn onto) a CPU proxy's results on other data
        spec["report"]["title"] = spec["report"].get("title", name).split(" (")[0] + " [--tiny CPU proxy]"
        spec["report"]["paper"] = small.get("report", {}).get("paper", {})
    spec["name"] = name + ("-tiny" if tiny else "")
    spec["folder"] = spec.get("runs_of", name) + ("-tiny" if tiny else "")  # grids can share runs (Tables 1, 3)
    spec["is_tiny"] = tiny
    spec["path"] = path
    if "students_of" in spec:
        spec["students"] = students(spec)
    return spec


def students(spec: dict) -> dict[str, list]:
    """{name: [points of the source grid]} this grid consumes: with `as`, one run per name; else every run that
    matches `select`, each named by its point name."""
    path, wanted = spec["path"], spec["students_of"]
    source = wanted["grid"]
    if source not in available() or source == spec["name"].removesuffix("-tiny"):
        raise _bad(path, "students_of.grid", f"no distillation grid {source!r} to take students from")
    if read_grid(source)[1].get("script", DEFAULT_SCRIPT) != DEFAULT_SCRIPT:  # checked before it is expanded
        raise _bad(path, "students_of.grid", f"{source} is not a grid of train_distill.py runs")
    source_spec = load_grid(source, spec["is_tiny"])
    select = wanted.get("select") or {}
    chosen = [p for p in points(source_spec) if all(p.args.get(k) == v for k, v in select.items())]
    if "as" not in wanted:
        if not chosen:
            raise _bad(path, "students_of.select", f"selects no point of {source_spec['name']}")
        return {p.name: [p] for p in chosen}
    named = {}
    for name, more in wanted["as"].items():
        named[name] = [p for p in chosen if all(p.args.get(k) == v for k, v in (more or {}).items())]
        if len(named[name]) != 1:
            raise _bad(path, f"students_of.as.{name}", f"selects {len(named[name])} points of {source_spec['name']}, "
                                                       "not exactly one")
    return named


def _student_ref(ref) -> tuple[str, str]:
    """A landscape point `name:selector` as (name, ":selector"), or (name, "") without a selector."""
    name, colon, selector = str(ref).rpartition(":")
    return (name, colon + selector) if colon else (selector, "")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else "+".join(map(str, value)) if isinstance(value, list) \
        else str(value)


def _folder_text(value) -> str:
    return _text(value).replace("/", ".").replace(":", ".")  # bottleneck strings hold slashes, points colons


def points(spec: dict) -> list[Point]:
    keys = list(spec.get("grid") or {})
    values = [spec["grid"][k] for k in keys]
    script, named = spec.get("script", DEFAULT_SCRIPT), spec.get("students", {})
    out = []
    for i, combo in enumerate(itertools.product(*values)):
        swept = dict(zip(keys, combo))
        name = "_".join(f"{k}-{_folder_text(v)}" for k, v in swept.items()) or "run"
        args = (spec.get("fixed") or {}) | swept
        used = list(named)
        if script == "landscape.py":  # `name:selector` of the three points; selector as landscape.py's
            used = [_student_ref(ref)[0] for ref in args.get("points", [])]
            unknown = [u for u in used if u not in named]
            if unknown or len(used) != 3:
                raise _bad(spec["path"], "grid.points", f"{args.get('points')!r}: three name:selector entries of "
                                                        f"the students named in students_of.as ({', '.join(named)})")
        source = spec.get("students_of", {}).get("grid", "")
        folder = source + ("-tiny" if spec.get("is_tiny") else "")
        inputs = tuple(dict.fromkeys((u, f"{folder}/{named[u][0].name}") for u in used))
        needs = tuple(sorted({p.index for u in used for p in named[u]}))
        out.append(Point(i, name, args, swept, tuple(spec.get("probe_on", [])), script, inputs, needs))
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
    dataset. The students a point consumes live beside its grid's folder, under the same --runs."""
    launch = launcher or [sys.executable]
    runs = Path(folder).parent.parent
    where = {name: str(runs / relative) for name, relative in point.inputs}
    args = dict(point.args)
    if point.script == "landscape.py":
        args["points"] = [where[name] + selector for name, selector in map(_student_ref, args["points"])]
    elif where:
        args = {"student": list(where.values())} | args
    cmds = [[*launch, point.script, *as_flags(args), "--output-dir", str(folder)]]
    for dataset in point.probe_on:
        cmds.append([*launch, "probe.py", "--student", str(folder), "--dataset", dataset])
    return cmds


def same_arguments(point: Point, config: dict) -> bool:
    return all(config.get(k) == v for k, v in point.args.items())


def finished(point: Point, folder: Path) -> bool:
    """The point's run (of exactly its arguments) and its transfer probes are done. imp.py, lmc.py and
    landscape.py folders are checked by the scripts themselves (fingerprint.json): a rerun with other
    arguments or students is refused there."""
    names = [Path(d).name for d in point.probe_on]
    mark = FINISHED_MARK[point.script]
    if point.script != DEFAULT_SCRIPT:
        return (folder / mark).exists() and (folder / "fingerprint.json").exists()
    if not (folder / mark).exists() or not same_arguments(point, read_config(folder) or {}):
        return False
    return all((folder / "probes" / n / "probe_results.json").exists() for n in names)


def shell(cmd: list[str]) -> str:
    return shlex.join(cmd)
