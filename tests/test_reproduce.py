"""reproduce.py: grids expand to stable points whose flags train_distill.py (and probe.py) accept, repeating over
random teachers; the paper's numbers in the grid files are the paper's; `run` skips finished points; `report`
aggregates exactly what the run folders hold (mean, sample std and n across teachers, numeric report.csv), from
local folders and from a (fake) Hub repo; the Slurm array's task id picks the same point as `--point`; the dry
run's GPU-hours count training and probing."""
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import yaml

import landscape
import lmc
import probe
import reproduce
import train_distill
import utils.grids
import utils.hub
from conftest import ROOT
from utils.aggregate import sweep
from utils.cli import repetition_seeds
from utils.costs import network_flop, point_cost
from utils.grids import GRID_DIR_ENV, available, commands, load_grid, points, run_dir

MINI = {"fixed": {"model": "vgg11", "width": 0.25, "hidden_dims": [32], "bottleneck_dim": 8, "out_dim": 64,
                  "batch_size": 64, "epochs": 1, "probe_epochs": 2, "log_every": 0, "probe_every": 0},
        "grid": {"repeat": [0, 1]},
        "report": {"kind": "table", "rows": ["model"], "probe": "linear", "title": "mini"}}


def load_script(name: str):
    """imp.py by file: `imp` is also a standard-library module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_test_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSERS = {"imp.py": lambda: load_script("imp").parse_args, "lmc.py": lambda: lmc.parse_args,
           "landscape.py": lambda: landscape.parse_args}


@pytest.mark.parametrize("grid", [g for g in available() if "students_of" in load_grid(g)])
def test_every_consuming_grid_expands_to_commands_its_script_accepts(grid, tmp_path):
    """imp.py / lmc.py / landscape.py grids: each command parses with the script's own parser, every argument of
    the grid file arrives, and the students are run folders of the distillation grid it names, under --runs."""
    for tiny in (False, True):
        spec = load_grid(grid, tiny)
        source = load_grid(spec["students_of"]["grid"], tiny)
        source_pts = points(source)
        pts = points(spec)
        assert pts and len({p.name for p in pts}) == len(pts)
        for p in pts:
            folder = run_dir(tmp_path, spec, p)
            (cmd,) = commands(p, folder)
            assert cmd[1] == p.script and p.script in PARSERS
            args = PARSERS[p.script]()(cmd[2:])
            assert args.output_dir == str(folder)
            for key, value in p.args.items():
                if key == "resolution":  # N is N x N
                    value = tuple(value * 2 if len(value) == 1 else value)
                if key != "points":
                    assert getattr(args, key) == value, (grid, key)
            needed = {str(run_dir(tmp_path, source, source_pts[i])) for i in p.needs}
            if p.script == "landscape.py":
                refs = [a.rpartition(":") for a in args.points]
                assert {r[0] for r in refs} == needed and [r[2] for r in refs] == \
                    [ref.rpartition(":")[2] for ref in p.args["points"]]
                # the plane's points come from one random teacher (same repetition of the source grid)
                assert len({source_pts[i].args["repeat"] for i in p.needs}) == 1
            else:
                assert set(args.student) == needed and len(args.student) == len(p.needs) >= 2
            select = spec["students_of"].get("select", {})
            assert all(source_pts[i].args.get(k) == v for i in p.needs for k, v in select.items())
        if tiny:  # the tiny version consumes tiny students: digits at a quarter width
            assert all(source_pts[i].args["dataset"] == "digits" and source_pts[i].args["width"] == 0.25
                       for p in pts for i in p.needs)


def test_paper_figures_6_9_10_and_15_to_18_have_grids():
    fig9, fig10 = load_grid("fig9"), load_grid("fig10")
    assert fig9["script"] == "imp.py" and fig9["fixed"]["rewind_epochs"] == [0, 1, 2, 5]
    assert fig9["fixed"]["prune_fraction"] == 0.2  # §6: "reducing the network by a fraction of 0.2 every round"
    assert fig10["script"] == "lmc.py" and fig10["fixed"]["copies"] == 5  # "5 different data orderings"
    assert len(points(fig10)[0].needs) == 3  # "3 checkpoints", each repetition with its own random teacher
    source = points(load_grid("fig4"))
    fig6 = points(load_grid("fig6"))
    alphas = [[source[i].args["alpha"] for i in p.needs] for p in fig6]
    assert alphas == [[1], [1e-10, 1]]  # left: the alpha = 1 run alone; right: alpha ~ 1e-10 and 1, one teacher
    fig15 = points(load_grid("fig15"))
    assert {(p.args["scope"], p.args["zoom"]) for p in fig15} == {("full", 1), ("full", 8), ("encoder", 1),
                                                                   ("encoder", 8)}
    assert all(p.args["coords"] == "ortho" for p in fig15)


@pytest.mark.parametrize("grid", [g for g in available() if "students_of" not in load_grid(g)])
def test_every_grid_expands_to_points_train_distill_accepts(grid, tmp_path):
    for tiny in (False, True):
        spec = load_grid(grid, tiny)
        pts = points(spec)
        assert pts and len({p.name for p in pts}) == len(pts)
        # repetitions draw new teachers: a grid repeats over --repeat (3 like the paper, 2 in tiny versions)
        assert "seed" not in spec["grid"] and len(spec["grid"]["repeat"]) >= (2 if tiny else 3)
        for p in pts:
            cmds = commands(p, tmp_path / p.name)
            assert cmds[0][1] == p.script == "train_distill.py"
            args = train_distill.parse_args(cmds[0][2:])
            assert all(getattr(args, k) == v or (k == "channels_last") for k, v in p.args.items()), p.name
            assert {k: getattr(args, k) for k in ("teacher_seed", "student_seed", "seed", "probe_seed")} == \
                repetition_seeds(p.args["repeat"])
            for cmd in cmds[1:]:  # the transfer probes
                assert probe.parse_args(cmd[2:]).dataset in p.probe_on


def paper_tables() -> dict[str, list[list[float]]]:
    """The numbers of each row of the paper's Tables 1-4 (tests/paper_tables.txt, verbatim from the paper)."""
    tables, name = {}, None
    for line in (ROOT / "tests" / "paper_tables.txt").read_text().splitlines():
        if line.startswith("== "):
            name = line.split()[2]
            tables[name] = []
        elif name and re.search(r"\d\.\d\d", line):
            tables[name].append([float(v) for v in re.findall(r"\d+\.\d\d", line)])
    return tables


def cells_of(table: str, rows: list[list[float]]) -> dict[str, dict[str, float]]:
    """The paper's cells keyed like the grid files: `<dataset>/<model>: {subject: value}`."""
    datasets = ["cifar10", "cifar100", "stl10", "tinyimagenet"]
    cells = {}
    if table in ("1", "3"):  # rows ResNet18 (teacher, student), VGG11 (teacher, student, input once per dataset)
        for d, (r18, vgg) in zip(datasets, zip(rows[::2], rows[1::2])):
            cells[f"{d}/resnet18"] = {"teacher": r18[0], "student": r18[1], "input": vgg[2]}
            cells[f"{d}/vgg11"] = {"teacher": vgg[0], "student": vgg[1], "input": vgg[2]}
    elif table == "2":  # one row per dataset: teachers (ResNet18, VGG11), students (ResNet18, VGG11)
        for d, row in zip(datasets, rows):
            cells[f"{d}/resnet18"] = {"teacher": row[0], "student": row[2]}
            cells[f"{d}/vgg11"] = {"teacher": row[1], "student": row[3]}
    else:  # Table 4: one row per dataset and model
        for (d, model), row in zip([(d, m) for d in datasets for m in ("resnet18", "vgg11")], rows):
            cells[f"{d}/{model}"] = {"teacher": row[0], "student": row[1]}
    return cells


@pytest.mark.parametrize("grid", [g for g in available() if g.startswith("table")])
def test_every_table_quotes_every_cell_the_paper_prints_and_nothing_else(grid):
    table = grid[len("table")]
    paper = cells_of(table, paper_tables()[table])
    assert sum(len(v) for v in paper.values()) == {"1": 24, "2": 12, "3": 24, "4": 12}[table]  # every printed cell
    assert load_grid(grid)["report"]["paper"] == paper
    assert load_grid(grid, tiny=True)["report"]["paper"] == {}  # never beside a CPU proxy on other data


def test_figure_paper_markers_are_table1_cells():
    table1 = cells_of("1", paper_tables()["1"])
    for grid, at in (("fig4", "1e-10"), ("fig11", "65536")):
        for key, values in load_grid(grid)["report"]["paper"].items():
            model, x = key.split("/")
            assert x == at and values.items() <= table1[f"cifar10/{model}"].items()


@pytest.fixture
def mini(tmp_path, tiny_dataset, monkeypatch):
    grids = tmp_path / "grids"
    grids.mkdir()
    spec = MINI | {"fixed": MINI["fixed"] | {"dataset": str(tiny_dataset)}}
    (grids / "mini.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv(GRID_DIR_ENV, str(grids))
    return tmp_path / "runs"


def counting_popen(monkeypatch) -> list:
    launched, real = [], subprocess.Popen

    def popen(cmd, **kwargs):
        launched.append(cmd)
        return real(cmd, **kwargs)

    monkeypatch.setattr(reproduce.subprocess, "Popen", popen)
    return launched


def test_run_skips_finished_points_and_report_matches_the_run_folders(mini, tmp_path, capsys, monkeypatch):
    launched = counting_popen(monkeypatch)
    assert reproduce.main(["run", "mini", "--runs", str(mini), "--point", "1"]) == 0  # as if stopped after it
    first = mini / "mini" / "repeat-1"
    stamp = (first / "summary.json").stat().st_mtime_ns

    # one repetition: numbers without ±, n = 1, std undefined (empty in the CSV)
    assert reproduce.main(["report", "mini", "--runs", str(mini)]) == 0
    md = (mini / "mini" / "report.md").read_text()
    assert "±" not in md.split("\n\n")[1] and "| 1 |" in md
    single = pd.read_csv(mini / "mini" / "report.csv")
    assert (single["teacher n"] == 1).all() and single["teacher std"].isna().all()

    assert reproduce.main(["run", "mini", "--runs", str(mini)]) == 0
    assert len(launched) == 2 and sum("repeat-1" in " ".join(c) for c in launched) == 1  # not redone
    assert (first / "summary.json").stat().st_mtime_ns == stamp
    assert reproduce.main(["run", "mini", "--runs", str(mini)]) == 0 and len(launched) == 2  # all skipped
    capsys.readouterr()
    assert reproduce.main(["status", "mini", "--runs", str(mini)]) == 0
    assert "2/2 finished" in capsys.readouterr().out

    # two repetitions, two random teachers: the report's mean, std and n are those of the run folders
    configs = [json.loads((mini / "mini" / f"repeat-{r}" / "config.json").read_text()) for r in (0, 1)]
    assert [c["teacher_seed"] for c in configs] == [0, 2]
    assert reproduce.main(["report", "mini", "--runs", str(mini)]) == 0
    table = pd.read_csv(mini / "mini" / "report.csv").set_index("model")
    numeric = [c for c in table.columns if c.split()[-1] in ("mean", "std", "n")]
    assert len(numeric) == 9 and all(pd.api.types.is_numeric_dtype(table[c]) for c in numeric)
    for subject in ("teacher", "student", "input"):
        values = pd.Series([100 * json.loads((mini / "mini" / f"repeat-{r}" / "summary.json").read_text())
                            ["probes"][subject]["linear"]["best"] for r in (0, 1)])
        assert table.loc["vgg11", f"{subject} mean"] == pytest.approx(values.mean())
        assert table.loc["vgg11", f"{subject} std"] == pytest.approx(values.std(ddof=1))
        assert table.loc["vgg11", f"{subject} n"] == 2
    assert table.loc["vgg11", "teacher std"] > 0  # two teachers, two teacher probes
    md = (mini / "mini" / "report.md").read_text()
    teacher = table.loc["vgg11"]
    assert f"{teacher['teacher mean']:.2f} ± {teacher['teacher std']:.2f}" in md
    assert (mini / "mini" / "report.png").stat().st_size > 0

    # the same runs, pushed to a Hub repo (folders named by run id), read back through the Hub seam
    fake = tmp_path / "hub"
    for folder in (mini / "mini").glob("repeat-*"):
        run_id = json.loads((folder / "config.json").read_text())["run_id"]
        (fake / "runs" / run_id).mkdir(parents=True)
        for name in ("config.json", "summary.json"):
            shutil.copy(folder / name, fake / "runs" / run_id / name)

    class FakeApi:
        def snapshot_download(self, repo_id, allow_patterns):
            assert repo_id == "team/sweep" and "runs/*/summary.json" in allow_patterns
            return str(fake)

    monkeypatch.setattr(utils.hub, "hub_api", lambda: FakeApi())
    local = (mini / "mini" / "report.csv").read_text()
    shutil.rmtree(mini / "mini")
    assert reproduce.main(["report", "mini", "--runs", str(mini), "--hub", "team/sweep"]) == 0
    assert (mini / "mini" / "report.csv").read_text() == local


def test_slurm_array_task_id_maps_to_the_same_point_as_dry_run(mini, capsys):
    assert reproduce.main(["run", "mini", "--runs", str(mini), "--dry-run"]) == 0
    def point_blocks(text):  # without the closing cost summary ("# total", "# derived ...")
        kept = [line for line in text.splitlines() if not line.startswith("# ") or line.startswith("# point ")]
        return "\n".join(kept).split("# point ")[1:]

    printed = capsys.readouterr().out
    blocks = point_blocks(printed)
    assert len(blocks) == 2
    assert "derived, not measured" in printed and re.search(r"# total: 2 points, [\d.]+-[\d.]+ GPU-hours", printed)
    for i in range(2):
        assert reproduce.main(["run", "mini", "--runs", str(mini), "--dry-run", "--point", str(i)]) == 0
        assert point_blocks(capsys.readouterr().out) == [blocks[i].rstrip("\n")]
    assert reproduce.main(["run", "mini", "--runs", str(mini), "--slurm", "--dry-run"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["sbatch", "--array=0-1", reproduce.SLURM_SCRIPT]
    script = (ROOT / reproduce.SLURM_SCRIPT).read_text()
    assert 'reproduce.py run "$grid" --point "$SLURM_ARRAY_TASK_ID"' in script
    assert not (mini / "mini").exists()  # a dry run runs nothing


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shell_scripts_are_shellcheck_clean():
    scripts = [ROOT / ".ci" / "run", *ROOT.glob("accelerate_configs/slurm/*.sbatch"),
               *ROOT.glob("accelerate_configs/slurm/*.sh"), *ROOT.glob("tools/**/*.sh"), *ROOT.glob("benchmarks/*.sh")]
    assert len(scripts) >= 12
    for script in scripts:
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_bad_grid_and_point_are_one_line_errors(mini, capsys):
    for argv, flag in ((["run", "nosuch"], "grid"), (["run", "mini", "--point", "9", "--runs", str(mini)], "--point"),
                       (["report", "mini", "--runs", str(mini)], "grid")):
        with pytest.raises(SystemExit) as exc:
            reproduce.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and flag in err[0], err


def test_derived_costs_count_probing_and_the_precision():
    base = {"dataset": "cifar10", "model": "resnet18", "epochs": 150}
    encoder, head = network_flop(base, 32)
    assert encoder == 1.111e9 and head == pytest.approx(45.1e6, rel=0.01)  # the measured forward FLOPs
    every_epoch, end_only = point_cost(base), point_cost(base | {"probe_every": 0})
    # probing every epoch: 149 more student probes (features of 60,000 images, one 10k x 50k k-NN search each)
    assert every_epoch.flop - end_only.flop == pytest.approx(149 * (60_000 * encoder + 2 * 10_000 * 50_000 * 512))
    # linear-probe steps: the student at init and after 150 epochs, the teacher, the pixels; 10 epochs of 196 batches
    assert every_epoch.probe_steps == (151 + 1 + 1) * 10 * math.ceil(50_000 / 256)
    low, high = every_epoch.hours()
    assert 0 < low < high
    bf16_low, bf16_high = point_cost(base | {"mixed_precision": "bf16"}).hours()
    assert bf16_low < low and bf16_high < high
    transfer = point_cost(base, ("cifar10",))
    assert transfer.flop > every_epoch.flop and transfer.commands == 2


@pytest.mark.parametrize("x,values,joined", [("norm", ["batch", "group", "none"], False), ("alpha", [0.0, 0.1, 1.0],
                                                                                           True)])
def test_categorical_sweeps_are_points_numeric_sweeps_are_lines(x, values, joined):
    rows = [{x: v, "model": m, "subject": s, "best": b, "final": b, "point": f"{m}-{v}"}
            for v in values for m in ("resnet18", "vgg11") for s, b in (("student", 40.0), ("teacher", 30.0))]
    fig, ax = plt.subplots()
    table, keys = sweep(ax, {"x": x, "hue": "model"}, pd.DataFrame(rows), {})
    plt.close(fig)
    assert keys == ["student best", "teacher"] and len(table) == 6
    styles = {line.get_linestyle() for line in ax.lines if line.get_marker() in ("o", "s", "^")}  # not the caps
    assert styles and (("None" not in styles) if joined else (styles == {"None"}))


@pytest.mark.parametrize("grid", [g for g in available() if "runs_of" in load_grid(g)])
def test_grids_that_share_runs_name_points_of_the_grid_they_share(grid):
    """Tables 2-4 and Fig. 1 add no training: each of their points is a point (same folder, same arguments) of
    the grid whose runs they read, in full and tiny form."""
    for tiny in (False, True):
        spec = load_grid(grid, tiny)
        owner = {p.name: p.args for p in points(load_grid(spec["runs_of"], tiny))}
        assert all(owner.get(p.name) == p.args for p in points(spec)), (grid, tiny)


GOOD = {"fixed": {"model": "vgg11", "epochs": 1}, "grid": {"repeat": [0, 1]}, "report": {"kind": "table"}}
CONSUMER = {"script": "lmc.py", "students_of": {"grid": "good", "select": {"model": "vgg11"}},
            "fixed": {"copies": 2, "epochs": 1}, "report": {"kind": "lmc"}}
# (file name, its text, what the one error line must name besides the file)
BAD_GRIDS = [
    ("typo_tiny", GOOD | {"tyni": {"fixed": {"epochs": 1}}}, "tyni: unknown key"),
    ("typo_grid", {"fixed": {"epochs": 1}, "grdi": {"repeat": [0]}, "report": {"kind": "table"}}, "grdi: unknown key"),
    ("typo_in_tiny", GOOD | {"tiny": {"fixd": {"epochs": 1}}}, "tiny.fixd: unknown key"),
    ("typo_in_report", GOOD | {"report": {"kind": "table", "titel": "x"}}, "report.titel: unknown key"),
    ("typo_in_tiny_report", GOOD | {"tiny": {"report": {"prob": "knn"}}}, "tiny.report.prob: unknown key"),
    ("yaml_error", "fixed: {epochs: 3\ngrid: [\n", "line "),
    ("no_report", {"fixed": {"epochs": 1}, "grid": {"repeat": [0]}}, "report: missing"),
    ("no_kind", GOOD | {"report": {"title": "x"}}, "report.kind: missing"),
    ("not_a_list", GOOD | {"grid": {"repeat": 0}}, "grid.repeat: swept values must be a non-empty list"),
    ("empty_list", GOOD | {"grid": {"repeat": []}}, "grid.repeat: swept values must be a non-empty list"),
    ("fixed_not_mapping", GOOD | {"fixed": ["epochs", 1]}, "fixed: must be a mapping"),
    ("not_a_flag", GOOD | {"fixed": {"epoch": 3}}, "fixed.epoch: not a flag of train_distill.py"),
    ("not_a_flag_in_tiny", GOOD | {"tiny": {"grid": {"lrr": [1]}}}, "tiny.grid.lrr: not a flag of train_distill.py"),
    ("reserved", GOOD | {"fixed": {"output_dir": "x"}}, "fixed.output_dir: the run folder is set by reproduce.py"),
    ("top_not_mapping", "- 1\n- 2\n", ": must be a mapping"),
    ("bad_script", GOOD | {"script": "foo.py"}, "script: 'foo.py' is not a script"),
    ("bad_kind", GOOD | {"report": {"kind": "lmc"}}, "report.kind: 'lmc' is not a report of train_distill.py"),
    ("distill_flag_to_lmc", CONSUMER | {"fixed": {"alpha": 0.1}}, "fixed.alpha: not a flag of lmc.py"),
    ("typo_students_of", CONSUMER | {"students_of": {"grid": "good", "selct": {}}}, "students_of.selct: unknown"),
    ("no_students_of", {k: v for k, v in CONSUMER.items() if k != "students_of"}, "students_of: a grid of imp.py"),
    ("students_of_nothing", CONSUMER | {"students_of": {"grid": "good", "select": {"model": "resnet18"}}},
     "students_of.select: selects no point"),
    ("students_of_unknown", CONSUMER | {"students_of": {"grid": "nosuch"}}, "students_of.grid: no distillation grid"),
    ("report_null", GOOD | {"report": None}, "report: missing"),
    ("students_of_a_consumer", CONSUMER | {"students_of": {"grid": "students_of_a_consumer"}},
     "students_of.grid: no distillation grid"),
    ("student_given", CONSUMER | {"fixed": {"student": ["x"]}}, "fixed.student: students come from `students_of`"),
    ("landscape_two_runs", {"script": "landscape.py", "students_of": {"grid": "good", "as": {"a": {}}},
                            "fixed": {"points": ["a:teacher", "a:init", "a:student"]}, "report": {"kind": "landscape"}},
     "students_of.as.a: selects 2 points"),
    ("landscape_unknown_name", {"script": "landscape.py", "students_of": {"grid": "good", "as": {"a": {"repeat": 0}}},
                                "fixed": {"points": ["a:teacher", "b:init", "a:student"]},
                                "report": {"kind": "landscape"}}, "grid.points:"),
]


@pytest.fixture
def grid_dir(tmp_path, monkeypatch):
    """A grid folder of its own (REPRODUCE_GRID_DIR), holding a valid grid `good` the bad ones may consume."""
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "good.yaml").write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv(GRID_DIR_ENV, str(grids))
    return grids


@pytest.mark.parametrize("i", range(len(BAD_GRIDS)), ids=[b[0] for b in BAD_GRIDS])
def test_bad_grid_files_are_one_line_naming_file_and_key(i, grid_dir, tmp_path, capsys):
    name, content, expected = BAD_GRIDS[i]
    path = grid_dir / f"{name}.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    runs = tmp_path / "runs"
    for verb in ("run", "status", "report"):
        with pytest.raises(SystemExit) as exc:
            reproduce.main([verb, name, "--runs", str(runs)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: argument grid: {path}: ") and expected in err[0], err[0]
    with pytest.raises(SystemExit):  # the tiny version is checked too (same file)
        reproduce.main(["run", name, "--tiny", "--dry-run"])
    assert not runs.exists()  # nothing created


@pytest.mark.parametrize("name", ["../experiments/fig4", "sub/grid", "..", "a\\b", ".hidden"])
def test_grid_names_with_paths_are_refused(name, grid_dir, tmp_path, capsys):
    (grid_dir.parent / "experiments").mkdir()
    (grid_dir.parent / "experiments" / "fig4.yaml").write_text(yaml.safe_dump(GOOD))
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["run", name, "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "is not a grid name" in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "experiments" / "fig4").exists()


class FakeRun:
    """Popen stand-in: 'runs' a point by writing what marks it finished (train_distill.py: summary.json and the
    config.json of its arguments; lmc.py: lmc_summary.csv, lmc.png, fingerprint.json)."""

    def __init__(self, cmd, **kwargs):
        self.cmd = cmd
        out = Path(cmd[cmd.index("--output-dir") + 1])
        out.mkdir(parents=True)
        if cmd[1] == "train_distill.py":
            args = vars(train_distill.parse_args(cmd[2:]))
            (out / "config.json").write_text(json.dumps(args, default=str))
            (out / "summary.json").write_text("{}")
        else:
            students = lmc.parse_args(cmd[2:]).student  # finished before it starts
            assert all((Path(s) / "summary.json").exists() for s in students)
            (out / "lmc_summary.csv").write_text("start,barrier_linear_mean,pairs\ninit,5.0,2\nstudent,1.0,2\n")
            (out / "lmc.png").write_bytes(b"png")
            (out / "fingerprint.json").write_text("{}")

    def wait(self):
        return 0


def test_consuming_grid_waits_for_its_students_then_runs_them_first(grid_dir, tmp_path, capsys, monkeypatch):
    (grid_dir / "consumer.yaml").write_text(yaml.safe_dump(CONSUMER))
    runs = tmp_path / "runs"
    assert reproduce.main(["status", "consumer", "--runs", str(runs)]) == 0
    assert "waiting      run  (for good points 0, 1)" in capsys.readouterr().out

    # an array task never trains another grid's points: one line saying which grid to run first
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["run", "consumer", "--point", "0", "--runs", str(runs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "waits for good points 0, 1" in err[0] and \
        "reproduce.py run good" in err[0]

    # Slurm: the students' array first, this grid's array after it (afterok)
    assert reproduce.main(["run", "consumer", "--runs", str(runs), "--slurm", "--dry-run"]) == 0
    first, second = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert first[:3] == ["STUDENTS_JOB=$(sbatch", "--parsable", "--array=0-1"] and first[4] == "good"
    assert second[:3] == ["sbatch", "--array=0-0", '--dependency=afterok:"$STUDENTS_JOB"']
    assert second[3:6] == ["--kill-on-invalid-dep=yes", reproduce.SLURM_SCRIPT, "consumer"]
    assert not runs.exists()

    # locally: the students first (only those not finished), then the point that consumes them
    launched = []
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda cmd, **kw: launched.append(cmd) or FakeRun(cmd, **kw))
    assert reproduce.main(["run", "good", "--point", "1", "--runs", str(runs)]) == 0
    assert reproduce.main(["run", "consumer", "--runs", str(runs)]) == 0
    scripts = [c[1] for c in launched]
    assert scripts == ["train_distill.py", "train_distill.py", "lmc.py"]
    assert "repeat=1" in " ".join(launched[0]) and "repeat=0" in " ".join(launched[1])  # repeat 1 was done
    student = launched[2][launched[2].index("--student") + 1:launched[2].index("--student") + 3]
    assert student == [str((runs / "good" / f"repeat-{r}").resolve()) for r in (0, 1)]
    capsys.readouterr()
    assert reproduce.main(["run", "consumer", "--runs", str(runs)]) == 0 and len(launched) == 3  # all finished
    assert reproduce.main(["status", "consumer", "--runs", str(runs)]) == 0
    assert "1/1 finished" in capsys.readouterr().out
    # Slurm with the students finished: one array, no dependency
    assert reproduce.main(["run", "consumer", "--runs", str(runs), "--slurm", "--dry-run"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["sbatch", "--array=0-0", reproduce.SLURM_SCRIPT]

    # the report gathers the point's figure and summary
    assert reproduce.main(["report", "consumer", "--runs", str(runs)]) == 0
    assert (runs / "consumer" / "run.png").read_bytes() == b"png"
    table = pd.read_csv(runs / "consumer" / "report.csv")
    assert list(table.barrier_linear_mean) == [5.0, 1.0] and set(table.point) == {"run"}
    assert "![run](run.png)" in (runs / "consumer" / "report.md").read_text()


@pytest.mark.parametrize("grid", ["fig9", "fig10", "fig6", "fig15"])
def test_dry_run_of_consuming_grids_says_costs_are_not_derived(grid, capsys):
    for tiny in ([], ["--tiny"]):
        assert reproduce.main(["run", grid, "--dry-run", *tiny]) == 0
        out = capsys.readouterr().out
        assert "cost not derived; needs fig4 points" in out and "GPU-hours not derived" in out
