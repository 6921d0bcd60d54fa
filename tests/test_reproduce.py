"""reproduce.py: grids expand to stable points whose flags train_distill.py accepts; `run` skips finished points;
`report` aggregates exactly what the run folders hold, from local folders and from a (fake) Hub repo; the Slurm
array's task id picks the same point as `--point`."""
import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

import reproduce
import train_distill
import utils.grids
import utils.hub
from conftest import ROOT
from utils.grids import as_flags, available, load_grid, points

MINI = {"fixed": {"model": "flatten", "hidden_dims": [32], "bottleneck_dim": 8, "out_dim": 64, "batch_size": 64,
                  "epochs": 1, "probe_epochs": 2, "log_every": 0, "probe_every": 0},
        "grid": {"alpha": [1.0], "seed": [0, 1]},
        "report": {"kind": "sweep", "x": "alpha", "probe": "knn", "title": "mini"}}


@pytest.mark.parametrize("grid", available())
def test_every_grid_expands_to_points_train_distill_accepts(grid, tmp_path):
    for tiny in (False, True):
        spec = load_grid(grid, tiny)
        pts = points(spec)
        assert pts and len({p.name for p in pts}) == len(pts)
        for p in pts:
            args = train_distill.parse_args(as_flags(p.args) + ["--output-dir", str(tmp_path / p.name)])
            assert all(getattr(args, k) == v or (k == "channels_last") for k, v in p.args.items()), p.name
    if spec["report"]["kind"] == "table":
        assert load_grid(grid)["report"]["paper"]  # the paper's numbers sit beside the measured ones


@pytest.fixture
def mini(tmp_path, tiny_dataset, monkeypatch):
    grids = tmp_path / "grids"
    grids.mkdir()
    spec = MINI | {"fixed": MINI["fixed"] | {"dataset": str(tiny_dataset)}}
    (grids / "mini.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(utils.grids, "GRID_DIR", grids)
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
    first = mini / "mini" / "alpha-1_seed-1"
    stamp = (first / "summary.json").stat().st_mtime_ns
    assert reproduce.main(["run", "mini", "--runs", str(mini)]) == 0
    assert len(launched) == 2 and sum("alpha-1_seed-1" in " ".join(c) for c in launched) == 1  # not redone
    assert (first / "summary.json").stat().st_mtime_ns == stamp
    assert reproduce.main(["run", "mini", "--runs", str(mini)]) == 0 and len(launched) == 2  # all skipped
    capsys.readouterr()
    assert reproduce.main(["status", "mini", "--runs", str(mini)]) == 0
    assert "2/2 finished" in capsys.readouterr().out

    assert reproduce.main(["report", "mini", "--runs", str(mini)]) == 0
    table = pd.read_csv(mini / "mini" / "report.csv").set_index("alpha")
    for alpha in (1.0,):
        best = [100 * json.loads((mini / "mini" / f"alpha-{alpha:g}_seed-{s}" / "summary.json").read_text())
                ["probes"]["student"]["knn"]["best"] for s in (0, 1)]
        expected = f"{pd.Series(best).mean():.2f} ± {pd.Series(best).std(ddof=0):.2f}"
        assert table.loc[alpha, "student"] == expected
    assert (mini / "mini" / "report.png").stat().st_size > 0 and (mini / "mini" / "report.md").exists()

    # the same runs, pushed to a Hub repo (folders named by run id), read back through the Hub seam
    fake = tmp_path / "hub"
    for folder in (mini / "mini").glob("alpha-*"):
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
    def point_blocks(text):
        return "\n".join(line for line in text.splitlines() if not line.startswith("# total")).split("# point ")[1:]

    blocks = point_blocks(capsys.readouterr().out)
    assert len(blocks) == 2
    for i in range(2):
        assert reproduce.main(["run", "mini", "--runs", str(mini), "--dry-run", "--point", str(i)]) == 0
        assert point_blocks(capsys.readouterr().out) == [blocks[i].rstrip("\n")]
    assert reproduce.main(["run", "mini", "--runs", str(mini), "--slurm", "--dry-run"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["sbatch", "--array=0-1", reproduce.SLURM_SCRIPT]
    script = (ROOT / reproduce.SLURM_SCRIPT).read_text()
    assert 'reproduce.py run "$grid" --point "$SLURM_ARRAY_TASK_ID"' in script
    assert not (mini / "mini").exists()  # a dry run runs nothing


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_slurm_scripts_are_shellcheck_clean():
    for script in (ROOT / "accelerate_configs" / "slurm").glob("*.sbatch"):
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_bad_grid_and_point_are_one_line_errors(mini, capsys):
    for argv, flag in ((["run", "nosuch"], "grid"), (["run", "mini", "--point", "9", "--runs", str(mini)], "--point"),
                       (["report", "mini", "--runs", str(mini)], "grid")):
        with pytest.raises(SystemExit) as exc:
            reproduce.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and flag in err[0], err
