"""The repetition rule (train_distill.py --repeat R): one index draws the teacher, the student's fresh init, the
data order and the probe seed together; explicit seeds win; config.json records the effective seeds; runs are
compared by their effective seeds; probe.py reuses the run's effective probe seed."""
import json

import pytest
import torch

import probe
import train_distill
from conftest import TINY_NET
from utils.cli import repetition_seeds
from utils.grids import as_flags, load_grid, points
from utils.hub import resolve_student

FAST = TINY_NET + ["--width", "0.25", "--batch-size", "64", "--epochs", "1", "--probe-epochs", "2", "--log-every",
                   "0", "--probe-every", "0"]
SEEDS = ("teacher_seed", "student_seed", "seed", "probe_seed")


def effective(argv) -> dict:
    args = train_distill.parse_args(argv + ["--output-dir", "unused"])
    return {k: getattr(args, k) for k in SEEDS}


def test_repeat_zero_is_the_historical_default_and_each_repeat_draws_new_seeds():
    assert effective([]) == effective(["--repeat", "0"]) == \
        {"teacher_seed": 0, "student_seed": 1, "seed": 0, "probe_seed": 0}
    assert effective(["--repeat", "1"]) == {"teacher_seed": 2, "student_seed": 3, "seed": 1, "probe_seed": 1}
    drawn = [effective(["--repeat", str(r)]) for r in range(5)]
    teachers, students = {d["teacher_seed"] for d in drawn}, {d["student_seed"] for d in drawn}
    assert len(teachers) == len(students) == 5 and not teachers & students  # no teacher is another's fresh init
    assert [repetition_seeds(r) for r in range(5)] == drawn


def test_an_explicit_seed_overrides_only_itself():
    assert effective(["--repeat", "1", "--teacher-seed", "0"]) == \
        {"teacher_seed": 0, "student_seed": 3, "seed": 1, "probe_seed": 1}
    assert effective(["--repeat", "2", "--seed", "7", "--probe-seed", "0"]) == \
        {"teacher_seed": 4, "student_seed": 5, "seed": 7, "probe_seed": 0}


def run(dataset, out, *extra):
    assert train_distill.main(FAST + ["--dataset", str(dataset), "--output-dir", str(out), *map(str, extra)]) == 0
    return json.loads((out / "config.json").read_text()), json.loads((out / "summary.json").read_text())["probes"]


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> dict:
    """Three finished runs: repeat 0, repeat 1, and repeat 1 with repeat 0's teacher asked for explicitly."""
    root = tmp_path_factory.mktemp("repeats")
    return {name: (root / name, *run(tiny_dataset, root / name, *extra))
            for name, extra in (("r0", ()), ("r1", ("--repeat", 1)), ("r1t0", ("--repeat", 1, "--teacher-seed", 0)))}


def teacher_weights(out) -> dict:
    student, _ = resolve_student(str(out))
    return student.build_teacher().state_dict()


def test_repeats_distil_from_different_teachers_and_an_explicit_seed_gives_the_same_teacher(runs):
    (out0, config0, probes0), (out1, config1, _), (out_same, config_same, probes_same) = runs.values()
    assert [c["teacher_seed"] for c in (config0, config1, config_same)] == [0, 2, 0]
    assert [c["repeat"] for c in (config0, config1, config_same)] == [0, 1, 1]
    t0, t1, t_same = map(teacher_weights, (out0, out1, out_same))
    conv = next(k for k in t0 if k.endswith("weight") and t0[k].dim() == 4)
    assert not torch.equal(t0[conv], t1[conv])
    assert all(torch.equal(t0[k], t_same[k]) for k in t0)
    # the same teacher on the same images: its k-NN probe (no seed involved) is identical; the student's fresh
    # init and the data order are repeat 1's in both repeat-1 runs
    assert probes_same["teacher"]["knn"]["final"] == probes0["teacher"]["knn"]["final"]
    assert config_same["student_seed"] == config1["student_seed"] == 3 and config_same["seed"] == 1


def test_runs_are_compared_by_their_effective_seeds(runs, tiny_dataset, capsys):
    out = runs["r1"][0]
    stamp = (out / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    # the derived seeds given explicitly: the same run, found finished
    assert train_distill.main(FAST + ["--dataset", str(tiny_dataset), "--output-dir", str(out), "--repeat", "1",
                                      "--teacher-seed", "2", "--probe-seed", "1"]) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    # the same effective seeds, however spelled (repeat 0 with every seed of repeat 1): the same run
    assert train_distill.main(FAST + ["--dataset", str(tiny_dataset), "--output-dir", str(out), "--teacher-seed",
                                      "2", "--student-seed", "3", "--seed", "1", "--probe-seed", "1"]) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    # another effective teacher, or another repetition: refused with one line naming the flag, nothing changed
    for extra, flag in ((["--repeat", "1", "--teacher-seed", "0"], "--teacher-seed"), (["--repeat", "2"], "--")):
        with pytest.raises(SystemExit) as exc:
            train_distill.main(FAST + ["--dataset", str(tiny_dataset), "--output-dir", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and flag in err[0] and "different arguments" in err[0], err
    assert (out / "summary.json").stat().st_mtime_ns == stamp


def test_probe_reuses_the_runs_effective_probe_seed(runs, tiny_dataset, tmp_path):
    out, config, probes = runs["r1"]
    assert probe.main(["--student", str(out), "--output-dir", str(tmp_path / "probed")]) == 0
    saved = json.loads((tmp_path / "probed" / "probe_results.json").read_text())
    assert saved["args"]["probe_seed"] == config["probe_seed"] == 1
    # the rebuilt teacher and the final student, probed with the run's seed, give the run's own numbers
    for subject in ("teacher", "student"):
        assert saved["results"][f"{subject}/linear/test"] == pytest.approx(probes[subject]["linear"]["final"])


def test_the_repetitions_of_a_table1_cell_record_three_different_teachers(tiny_dataset, tmp_path):
    """Table 1's CIFAR10 / ResNet18 cell, run at CPU size (data and widths replaced, repetitions kept)."""
    cell = [p for p in points(load_grid("table1")) if p.swept["dataset"] == "cifar10"
            and p.swept["model"] == "resnet18"]
    assert [p.args["repeat"] for p in cell] == [0, 1, 2]
    configs = []
    for point in cell:
        args = point.args | {"dataset": str(tiny_dataset), "epochs": 1, "width": 0.125, "hidden_dims": [32],
                             "bottleneck_dim": 8, "out_dim": 64, "batch_size": 128, "probe_epochs": 1,
                             "probe_every": 0, "log_every": 0}
        out = tmp_path / point.name
        assert train_distill.main(as_flags(args) + ["--output-dir", str(out)]) == 0
        configs.append(json.loads((out / "config.json").read_text()))
    assert [c["model"] for c in configs] == ["resnet18"] * 3
    assert len({c["teacher_seed"] for c in configs}) == 3
    assert [{k: c[k] for k in SEEDS} for c in configs] == [repetition_seeds(r) for r in range(3)]
