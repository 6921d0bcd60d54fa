"""Linear mode connectivity (lmc.py, utils/lmc.py): exact endpoints, zero barrier for a self-pair, both barrier
definitions, BN statistics recomputed exactly, copies that differ only through their data seed, and the script."""
import copy

import pandas as pd
import pytest
import torch

import lmc
from supervised_helpers import TINY_RECIPE, NoSignal, save_tiny_student, tiny_classifier, tiny_data, tiny_trainer
from utils.data import Normalizer
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
            assert errors[gamma_end] == 1 - trainer.evaluate(probe)
        self_pair = error_along_path(probe, runs["a"], runs["a"], torch.linspace(0, 1, 7).tolist(), trainer.evaluate,
                                     bn, images, trainer.normalize, 32)
        assert barriers(torch.linspace(0, 1, 7).tolist(), self_pair) == {"linear": 0.0, "mean": 0.0,
                                                                         "max_error": self_pair[0]}


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
            result = pd.read_json(out / row.start / f"copy-{seed}" / "result.json", typ="series")
            assert row[col] == pytest.approx(1 - result["final"], abs=1e-12)
    assert (table.max_error >= table[["error_i", "error_j"]].max(axis=1)).all()
    assert (out / "lmc.png").stat().st_size > 10_000 and (out / "lmc_summary.csv").exists()
    assert "barrier_linear_mean" in capsys.readouterr().out


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
