"""Linear mode connectivity (lmc.py, utils/lmc.py): exact endpoints, zero barrier for a self-pair, both barrier
definitions, BN statistics recomputed exactly, copies that differ only through their data seed, and the script."""
import copy
import json
import os
import shutil
import signal
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch

import lmc
from supervised_helpers import TINY_RECIPE, NoSignal, save_tiny_student, tiny_classifier, tiny_data, tiny_trainer
from utils.data import Normalizer, load_dataset
from utils.hub import resolve_student
from utils.supervised import Classifier, SupervisedTrainer
from utils.lmc import barriers, error_along_path, interpolate_state, recompute_bn_stats


def states():
    return tiny_classifier(0).state_dict(), tiny_classifier(1).state_dict()


def test_interpolation_endpoints_are_exact_and_a_self_pair_never_moves():
    a, b = states()
    assert all(torch.equal(interpolate_state(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(interpolate_state(a, b, 1.0)[k], b[k]) for k in a)
    for gamma in torch.linspace(0, 1, 50).tolist():
        assert all(torch.equal(interpolate_state(a, a, gamma)[k], a[k]) for k in a)
    mid = interpolate_state(a, b, 0.25)["fc.weight"]
    assert torch.allclose(mid, 0.75 * a["fc.weight"] + 0.25 * b["fc.weight"])


def test_barrier_definitions_on_known_curves():
    gammas = torch.linspace(0, 1, 51).tolist()
    bump = barriers(gammas, [4 * g * (1 - g) for g in gammas])
    assert bump["linear"] == pytest.approx(1) and bump["mean"] == pytest.approx(1)
    ramp = barriers(gammas, gammas)  # err 0 -> 1 linearly: no barrier above the chord, 0.5 above the mean
    assert ramp["linear"] == pytest.approx(0, abs=1e-12) and ramp["mean"] == pytest.approx(0.5)


def test_recomputed_bn_statistics_equal_a_direct_pass_over_the_subset():
    data = tiny_data()
    normalize = Normalizer(data.mean, data.std, "cpu")
    images = data.train.images[:32]
    model, direct = tiny_classifier(), tiny_classifier()
    recompute_bn_stats(model, images, normalize, batch_size=32)
    for m in direct.modules():  # momentum 1: the running statistics become this one pass's batch statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        direct.train()(normalize(images))
    for k, v in model.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, direct.state_dict()[k], rtol=1e-6, atol=1e-7)
    assert not model.training and all(m.momentum == 0.1 for m in model.modules()
                                      if isinstance(m, torch.nn.BatchNorm2d))
    halves = tiny_classifier()  # two batches: the equal-weight average of the two batches' statistics
    recompute_bn_stats(halves, images, normalize, batch_size=16)
    stats = []
    for part in (images[:16], images[16:]):
        one = tiny_classifier()
        recompute_bn_stats(one, part, normalize, batch_size=16)
        stats.append(one.state_dict())
    for k, v in halves.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, (stats[0][k] + stats[1][k]) / 2)


def test_copies_with_the_same_data_seed_are_identical_and_with_different_seeds_differ(tmp_path):
    trainer = tiny_trainer(epochs=2)
    start = trainer.state()
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer.load_state(start)
        trainer.train(tmp_path / name, seed, 0, NoSignal())
        runs[name] = trainer.state()["model"]
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["fc.weight"], runs["c"]["fc.weight"])
    probe = copy.deepcopy(trainer.raw)
    images = tiny_data().train.images[:32]
    # gamma = 0 / 1 reproduce each endpoint's own error; with interpolated BN it is the error as trained
    for bn in ("interpolate", "recompute"):
        errors = error_along_path(probe, runs["a"], runs["c"], [0.0, 0.5, 1.0], trainer.evaluate, bn, images,
                                  trainer.normalize, 32)
        for gamma_end, state in ((0, runs["a"]), (-1, runs["c"])):
            probe.load_state_dict(state)
            if bn == "recompute":
                recompute_bn_stats(probe, images, trainer.normalize, 32)
            assert errors[gamma_end] == pytest.approx(error_by_hand(probe, tiny_data()), abs=1e-6)  # 1 image: 1/24
        self_pair = error_along_path(probe, runs["a"], runs["a"], torch.linspace(0, 1, 7).tolist(), trainer.evaluate,
                                     bn, images, trainer.normalize, 32)
        assert barriers(torch.linspace(0, 1, 7).tolist(), self_pair) == {"linear": 0.0, "mean": 0.0,
                                                                         "max_error": self_pair[0]}


def error_by_hand(model, data) -> float:
    """Test error in eval mode, one forward pass over the clean, normalised test images (float32 rounding: the
    scripts compute 1 - accuracy)."""
    model.eval()
    with torch.no_grad():
        logits = model(Normalizer(data.mean, data.std, "cpu")(data.test.images))
    return float((logits.argmax(1) != data.test.labels).float().mean())


def check_pair_rows_against_their_curves(table: pd.DataFrame, curves: pd.DataFrame) -> None:
    for _, row in table.iterrows():
        curve = curves[(curves.student == row.student) & (curves.start == row.start) & (curves.copy_i == row.copy_i)
                       & (curves.copy_j == row.copy_j)].sort_values("gamma")
        g, e = curve.gamma.tolist(), curve.error.tolist()
        assert g[0] == 0 and g[-1] == 1 and (row.error_i, row.error_j) == (e[0], e[-1])
        assert row.max_error == max(e)
        assert row.barrier_mean == pytest.approx(max(e) - (e[0] + e[-1]) / 2, abs=1e-12)
        assert row.barrier_linear == pytest.approx(max(x - ((1 - t) * e[0] + t * e[-1]) for t, x in zip(g, e)),
                                                   abs=1e-12)


def test_lmc_end_to_end_writes_tables_and_figure(tiny_dataset, tmp_path, capsys):
    student = save_tiny_student(tmp_path / "student")
    out = tmp_path / "lmc"
    args = ["--student", str(student), "--dataset", str(tiny_dataset), "--output-dir", str(out), *TINY_RECIPE,
            "--epochs", "1", "--lr-milestones", "--copies", "2", "--gammas", "5", "--bn", "interpolate",
            "--bn-subset", "128"]
    assert lmc.main(args) == 0
    table, curves = pd.read_csv(out / "lmc_table.csv"), pd.read_csv(out / "lmc_curves.csv")
    assert table.start.tolist() == ["student", "init"] and len(curves) == 2 * 5
    for _, row in table.iterrows():  # endpoints are the copies' own final test errors (BN as trained)
        for col, seed in (("error_i", row.copy_i), ("error_j", row.copy_j)):
            result = pd.read_json(out / row.student / row.start / f"copy-{seed}" / "result.json", typ="series")
            assert row[col] == pytest.approx(1 - result["final"], abs=1e-12)
    check_pair_rows_against_their_curves(table, curves)
    assert (out / "lmc.png").stat().st_size > 10_000 and (out / "lmc_summary.csv").exists()
    assert "barrier_linear_mean" in capsys.readouterr().out


# ------------------------------------------------------------ default BN, several students, fingerprints
def lmc_args(students, dataset, out, *extra):
    return ["--student", *map(str, students), "--dataset", str(dataset), "--output-dir", str(out), *TINY_RECIPE,
            "--epochs", "1", "--lr-milestones", "--starts", "student", "--copies", "3", "--gammas", "3", "--bn-subset",
            "128", *extra]


def snapshot(folder: Path) -> dict:
    """Every path under `folder`, with each file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def two_students(tiny_dataset, tmp_path_factory):
    """Two students, 3 copies each (3 pairs), BatchNorm recomputed at every point (the default)."""
    root = tmp_path_factory.mktemp("lmc2")
    students = [save_tiny_student(root / "a", alpha=0.5), save_tiny_student(root / "b", alpha=0.7)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_TEACHERS_CACHE", str(root / "cache"))
        assert lmc.main(lmc_args(students, tiny_dataset, root / "run")) == 0
    made = json.loads((root / "run" / "fingerprint.json").read_text())
    folders = [root / "run" / entry["folder"] for entry in made["students"]]
    return students, root / "run", folders


def test_default_bn_recomputes_statistics_at_every_point_end_to_end(two_students, tiny_dataset):
    students, out, folders = two_students
    data = load_dataset(str(tiny_dataset))
    normalize = Normalizer(data.mean, data.std, "cpu")
    bn_images = normalize(data.train.images[torch.randperm(256, generator=torch.Generator().manual_seed(0))[:128]])
    for student, folder in zip(students, folders):
        curves = pd.read_csv(folder / "lmc_curves.csv")
        assert len(curves) == 3 * 3 and set(curves.gamma) == {0.0, 0.5, 1.0}
        check_pair_rows_against_their_curves(pd.read_csv(folder / "lmc_table.csv"), curves)
        net = resolve_student(str(student))[0]
        model = Classifier(net.encoder, net.embed_dim, 10, 0)
        a, b = (torch.load(folder / "student" / f"copy-{k}" / "final.pt")["model"] for k in (0, 1))
        for gamma in (0.0, 0.5, 1.0):
            model.load_state_dict({k: ((1 - gamma) * v.double() + gamma * b[k].double()).to(v.dtype)
                                   if v.is_floating_point() else v for k, v in a.items()})
            for m in model.modules():  # statistics of the BN subset, as one train-mode pass
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            with torch.no_grad():
                model.train()(bn_images)
            got = curves[(curves.copy_i == 0) & (curves.copy_j == 1) & (curves.gamma == gamma)].error.item()
            assert got == pytest.approx(error_by_hand(model, data), abs=1e-6), gamma  # one image: 1/128


def test_two_students_aggregate_to_the_mean_and_std_over_every_student_and_pair(two_students):
    _, out, folders = two_students
    rows = pd.concat([pd.read_csv(f / "lmc_table.csv") for f in folders])
    (got,) = pd.read_csv(out / "lmc_summary.csv").itertuples()
    assert got.start == "student" and got.pairs == 6 and got.students == 2
    for column in ("max_error", "barrier_linear", "barrier_mean"):
        values = [100 * v for v in rows[column]]
        assert getattr(got, f"{column}_mean") == pytest.approx(statistics.mean(values), abs=1e-9)
        assert getattr(got, f"{column}_std") == pytest.approx(statistics.stdev(values), abs=1e-9)
    endpoint = [100 * (i + j) / 2 for i, j in zip(rows.error_i, rows.error_j)]
    assert got.endpoint_error_mean == pytest.approx(statistics.mean(endpoint), abs=1e-9)
    assert len(pd.read_csv(out / "lmc_curves.csv")) == 2 * 3 * 3


@pytest.mark.parametrize("change,flag,words", [
    ("student", "--student", "from other students (weights hashes"),
    (["--lr", "0.05"], "--lr", "was made with 0.1, asked 0.05"),
    (["--epochs", "2"], "--epochs", "was made with 1, asked 2"),
    (["--bn", "interpolate"], "--bn", 'was made with "recompute", asked "interpolate"'),
])
def test_another_student_or_other_settings_are_refused_and_change_nothing(change, flag, words, two_students,
                                                                          tiny_dataset, tmp_path, monkeypatch,
                                                                          capsys):
    students, out, _ = two_students
    monkeypatch.setattr("utils.data.load_dataset", lambda *a, **k: pytest.fail("data loaded before the check"))
    before = snapshot(out)
    argv = lmc_args([students[0], save_tiny_student(tmp_path / "c", alpha=0.9)], tiny_dataset, out) \
        if change == "student" else lmc_args(students, tiny_dataset, out, *change)
    with pytest.raises(SystemExit) as exit_info:
        lmc.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: argument {flag}: {out} was made ") and words in err[0], err
    assert snapshot(out) == before


def test_the_same_command_twice_trains_and_interpolates_nothing(two_students, tiny_dataset, tmp_path, monkeypatch):
    students, out, folders = two_students
    before = {f: snapshot(f) for f in folders}
    monkeypatch.setattr(SupervisedTrainer, "step", lambda *a: pytest.fail("a finished copy was retrained"))
    monkeypatch.setattr(lmc, "error_along_path", lambda *a, **k: pytest.fail("a finished pair was recomputed"))
    summary = pd.read_csv(out / "lmc_summary.csv")
    moved = shutil.copytree(students[0], tmp_path / "moved")  # the same weights under another name
    assert lmc.main(lmc_args([students[1], moved], tiny_dataset, out)) == 0  # nor does the students' order
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(["configs", *(f.name for f in folders)])
    assert all(snapshot(f) == before[f] for f in folders)
    pd.testing.assert_frame_equal(pd.read_csv(out / "lmc_summary.csv"), summary)


def test_interrupted_pairs_resume_and_a_new_start_evaluates_only_its_own_pairs(tiny_dataset, tmp_path, monkeypatch):
    student = save_tiny_student(tmp_path / "student")
    real, calls = lmc.error_along_path, []

    def counted(*args, **kwargs):
        calls.append(1)
        errors = real(*args, **kwargs)
        if signal_after_first and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm's pre-emption, in the middle of the pairs
        return errors

    monkeypatch.setattr(lmc, "error_along_path", counted)
    signal_after_first = True
    out = tmp_path / "run"
    assert lmc.main(lmc_args([student], tiny_dataset, out)) == 128 + signal.SIGTERM
    (folder,) = [p for p in out.iterdir() if p.name.startswith("student-")]
    assert sorted(p.name for p in (folder / "student").glob("pair-*")) == ["pair-0-1.json"]
    assert not (folder / "lmc_table.csv").exists()
    signal_after_first, calls[:] = False, []
    assert lmc.main(lmc_args([student], tiny_dataset, out, "--starts", "student", "init")) == 0
    assert len(calls) == 2 + 3  # the student's two missing pairs, then the new start's three
    whole = tmp_path / "whole"  # the same in one go
    assert lmc.main(lmc_args([student], tiny_dataset, whole, "--starts", "student", "init")) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "lmc_table.csv"), pd.read_csv(whole / "lmc_table.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "lmc_curves.csv"), pd.read_csv(whole / "lmc_curves.csv"))


def test_a_damaged_pair_file_is_evaluated_again_not_a_traceback(tiny_dataset, tmp_path, monkeypatch):
    student, out = save_tiny_student(tmp_path / "student"), tmp_path / "run"
    assert lmc.main(lmc_args([student], tiny_dataset, out)) == 0
    table = pd.read_csv(out / "lmc_table.csv")
    (folder,) = [p for p in out.iterdir() if p.name.startswith("student-")]
    (folder / "student" / "pair-0-2.json").write_text('{"gammas": [0.0, 0.5')  # cut short, as by a hand edit
    real, calls = lmc.error_along_path, []
    monkeypatch.setattr(lmc, "error_along_path", lambda *a, **k: calls.append(1) or real(*a, **k))
    (folder / "lmc_table.csv").unlink()  # so that the run is not already finished
    assert lmc.main(lmc_args([student], tiny_dataset, out)) == 0
    assert len(calls) == 1  # only the damaged pair
    pd.testing.assert_frame_equal(pd.read_csv(out / "lmc_table.csv"), table)


@pytest.mark.parametrize("extra,flag", [(["--copies", "1"], "--copies"), (["--gammas", "1"], "--gammas"),
                                        (["--starts", "checkpoint"], "--checkpoint"),
                                        (["--student", "/no/such/student"], "--student")])
def test_bad_input_is_one_line_naming_the_flag(extra, flag, monkeypatch, capsys):
    monkeypatch.setattr("utils.data.load_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    if flag != "--student":
        monkeypatch.setattr("utils.supervised.load_student", lambda *a, **k: pytest.fail("student loaded first"))
    with pytest.raises(SystemExit) as exit_info:
        lmc.main(["--student", "S", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and flag in err[0], err
