"""IMP (imp.py, utils/pruning.py) and the shared supervised recipe (utils/supervised.py): exact pruning counts,
smallest-magnitude choice, shrinking masks, pruned weights that stay exactly 0, bit-exact rewinding, a real
SIGTERM mid-round with a bitwise identical rerun, and one-line errors for bad input."""
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from supervised_helpers import TINY_RECIPE, NoSignal, save_tiny_student, tiny_classifier, tiny_trainer
from utils.cli import UsageError
from utils.pruning import apply_masks, full_masks, kept, prune_round, prunable_names, scope_size
from utils.supervised import Recipe, SupervisedTrainer, crop_and_flip, epoch_augmentation

ROOT = Path(__file__).resolve().parents[1]
# Loaded by path: on Python < 3.12 `import imp` may give the standard library's deprecated module instead.
_spec = importlib.util.spec_from_file_location("imp_script", ROOT / "imp.py")
imp_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imp_script)


# ------------------------------------------------------------------------------------------ pruning maths
@pytest.mark.parametrize("scope", ["weights", "all"])
def test_kept_fraction_is_exact_smallest_pruned_and_masks_only_shrink(scope):
    model = tiny_classifier()
    masks = full_masks(model, scope)
    n = scope_size(masks)
    g = torch.Generator().manual_seed(1)
    for r in range(1, 7):
        with torch.no_grad():  # 'training' between rounds moves the weights, so each round ranks anew
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        apply_masks(model, masks)
        params = dict(model.named_parameters())
        new = prune_round(model, masks, 0.2, r)
        assert abs(kept(new) - n * 0.8 ** r) <= 1
        for name in masks:
            assert not (new[name] & ~masks[name]).any(), "a pruned weight came back"
        pruned_now = torch.cat([params[k].detach()[masks[k] & ~new[k]].abs() for k in masks])
        still = torch.cat([params[k].detach()[new[k]].abs() for k in masks])
        assert len(pruned_now) and pruned_now.max() <= still.min()
        masks = new


def test_scope_weights_is_conv_and_linear_weights_only_and_leaves_the_rest_unpruned():
    model = tiny_classifier()
    assert prunable_names(model, "weights") == ["encoder.0.weight", "encoder.3.weight", "fc.weight"]
    assert prunable_names(model, "all") == [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = full_masks(model, "weights")
    for r in range(1, 5):
        masks = prune_round(model, masks, 0.2, r)
        apply_masks(model, masks)
    for name, p in model.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0).all() and (~masks[name]).any()
        else:  # biases and BatchNorm weight / bias
            assert torch.equal(p, before[name]), name


# --------------------------------------------------------------------------------- the supervised recipe
def test_lr_schedule_and_augmentation_are_functions_of_seed_and_epoch():
    recipe = Recipe()
    assert [recipe.lr_at(e) for e in (1, 80, 81, 120, 121, 160)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    a, b = epoch_augmentation(100, 3, 7, recipe, "cpu"), epoch_augmentation(100, 3, 7, recipe, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], epoch_augmentation(100, 3, 8, recipe, "cpu")[0])
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    centre, no, yes = torch.full((4, 2), 4), torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    assert torch.equal(crop_and_flip(images, centre, no, 4), images)
    assert torch.equal(crop_and_flip(images, centre, yes, 4), images.flip(-1))
    shifted = crop_and_flip(images, torch.tensor([[0, 8]] * 4), no, 4)  # 4 px up-right: black rows / columns
    assert (shifted[:, :, :4] == 0).all() and torch.equal(shifted[:, :, 4, :1], images[:, :, 0, 4:])


def test_pruned_weights_stay_exactly_zero_through_momentum_and_weight_decay(tmp_path):
    trainer = tiny_trainer(epochs=3, weight_decay=0.05)  # a large decay: any regrowth would show
    masks = prune_round(trainer.raw, full_masks(trainer.raw, "all"), 0.5, 1)
    trainer.masks = masks
    trainer.load_state({"model": trainer.raw.state_dict()}, optimizer=False)
    before = trainer.state()["model"]
    assert trainer.train(tmp_path, 0, 0, NoSignal()) is not None
    params = dict(trainer.raw.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        assert not torch.equal(params[name][mask], before[name][mask])  # the kept ones did train
    momentum = trainer.optimizer.state[params["fc.weight"]]["momentum_buffer"]
    assert (momentum[~masks["fc.weight"]] != 0).any()  # the re-masking, not a zero gradient, keeps them at 0


def test_rewind_restores_weights_and_optimizer_state_bit_exactly(tmp_path):
    trainer = tiny_trainer(epochs=3)
    saved = {}
    trainer.train(tmp_path / "dense", 0, 0, NoSignal(), on_epoch_end=lambda e: saved.setdefault(e, trainer.state()))
    rewind = saved[1]
    momenta = rewind["optimizer"]["state"]
    assert momenta and all("momentum_buffer" in s for s in momenta.values())
    trainer.load_state(rewind)
    assert all(torch.equal(v, rewind["model"][k]) for k, v in trainer.raw.state_dict().items())
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["momentum_buffer"], momenta[i]["momentum_buffer"]) for i in momenta)
    trainer.load_state(rewind, optimizer=False)  # OpenLTH: fresh momentum at the rewind point
    assert trainer.optimizer.state_dict()["state"] == {}
    masks = prune_round(trainer.raw, full_masks(trainer.raw), 0.2, 1)
    trainer.masks = masks
    trainer.load_state(rewind)  # the ticket: mask * rewound weights
    for name, p in trainer.raw.named_parameters():
        expected = rewind["model"][name] * masks[name] if name in masks else rewind["model"][name]
        assert torch.equal(p, expected)


# ------------------------------------------------------------------------------------------ imp.py itself
def imp_args(student, dataset, out, *extra):
    students = student if isinstance(student, (list, tuple)) else [student]
    return ["--student", *map(str, students), "--dataset", str(dataset), "--output-dir", str(out), *TINY_RECIPE,
            "--rounds", "2", "--starts", "student", "init", "--rewind-epochs", "0", "1", *map(str, extra)]


def finals(out: Path) -> dict:
    return {str(p.relative_to(out)): torch.load(p, weights_only=False)["model"] for p in sorted(out.rglob("final.pt"))}


def snapshot(folder: Path) -> dict:
    """Every path under `folder`, with each file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def student_folders(out: Path) -> list[Path]:
    return [out / entry["folder"] for entry in json.loads((out / "fingerprint.json").read_text())["students"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset):
    """One uninterrupted tiny IMP run (student + init with rewinds 0 and 1, two rounds); records the state and
    start epoch every training run began from."""
    root = tmp_path_factory.mktemp("imp")
    student = save_tiny_student(root / "student")
    entries, original = {}, SupervisedTrainer.train

    def train(self, folder, data_seed, start_epoch, *args, **kwargs):
        entries[Path(folder)] = {"start_epoch": start_epoch, "data_seed": data_seed, "state": self.state()}
        return original(self, folder, data_seed, start_epoch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_TEACHERS_CACHE", str(root / "cache"))
        mp.setattr(SupervisedTrainer, "train", train)
        assert imp_script.main(imp_args(student, tiny_dataset, root / "run")) == 0
    (sub,) = student_folders(root / "run")
    return SimpleNamespace(student=student, out=root / "run", sub=sub, entries=entries)


ARMS = (("student-l0", "student", 0), ("init-l0", "init", 0), ("init-l1", "init", 1))


def test_imp_end_to_end_writes_table_masks_and_figure(reference):
    out, sub = reference.out, reference.sub
    assert sub.name.startswith("student-") and (sub / "fingerprint.json").exists()
    table = pd.read_csv(out / "imp_table.csv")
    assert set(map(tuple, table[["start", "rewind_epoch"]].drop_duplicates().values)) == \
        {("student", 0), ("init", 0), ("init", 1)}
    assert table.groupby(["start", "rewind_epoch"]).size().eq(3).all()  # rounds 0, 1, 2
    assert table.weights_remaining.tolist() == pytest.approx([0.8 ** r for r in table["round"]], abs=1e-4)
    for _, row in table.iterrows():  # best = max over the round's evaluated epochs, final = its last epoch
        arm = f"{row.start}/round-0" if row["round"] == 0 else f"{row.start}-l{row.rewind_epoch}/round-{row['round']}"
        metrics = pd.read_csv(sub / f"seed-{row.seed}" / arm / "metrics.csv")
        accuracy = metrics[metrics.metric == "test/accuracy"].sort_values("epoch")
        assert row.best_accuracy == pytest.approx(accuracy.value.max(), abs=1e-12)
        assert row.final_accuracy == pytest.approx(accuracy.value.iloc[-1], abs=1e-12)
        assert row.best_epoch == accuracy.epoch.iloc[accuracy.value.argmax()]
    pd.testing.assert_frame_equal(table, pd.read_csv(sub / "imp_table.csv"))  # one student: the same rows
    assert (out / "imp.png").stat().st_size > 10_000 and (out / "imp_summary.csv").exists()
    round2 = sub / "seed-0" / "init-l1" / "round-2"
    report = json.loads((round2 / "sparsity.json").read_text())
    assert set(report["layers"]) == set(torch.load(round2 / "mask.pt"))
    masks, weights = torch.load(round2 / "mask.pt"), torch.load(round2 / "final.pt")["model"]
    assert all((weights[n][~m] == 0).all() for n, m in masks.items())  # still zero after the last SGD step
    assert not any(p.name == "checkpoints" for p in out.rglob("checkpoints"))


def test_each_rounds_mask_is_global_magnitude_pruning_of_the_previous_rounds_final_weights(reference):
    sub = reference.sub / "seed-0"
    for arm, start, _ in ARMS:
        previous, previous_mask = sub / start / "round-0" / "final.pt", None
        for r in (1, 2):
            folder = sub / arm / f"round-{r}"
            mask, weights = torch.load(folder / "mask.pt"), torch.load(previous, weights_only=False)["model"]
            # scope 'weights': every conv and linear weight (4-d and 2-d), nothing else
            assert set(mask) == {n for n, w in weights.items() if n.endswith(".weight") and w.dim() in (2, 4)}
            names = sorted(mask)
            magnitude = torch.cat([weights[n].abs().flatten() for n in names])
            alive = torch.ones(len(magnitude), dtype=torch.bool) if previous_mask is None else \
                torch.cat([previous_mask[n].flatten() for n in names])
            keep = torch.topk(torch.where(alive, magnitude, torch.tensor(-1.0)), round(len(magnitude) * 0.8 ** r))
            expected = torch.zeros(len(magnitude), dtype=torch.bool)
            expected[keep.indices] = True
            assert torch.equal(torch.cat([mask[n].flatten() for n in names]), expected), (arm, r)
            previous, previous_mask = folder / "final.pt", mask


def test_each_round_starts_from_mask_times_the_rewind_point_and_trains_epochs_l_plus_1_to_the_end(reference):
    sub = reference.sub / "seed-0"
    for arm, start, rewind in ARMS:
        point = torch.load(sub / start / "round-0" / "rewind" / f"epoch-{rewind}.pt", weights_only=False)
        assert point["epoch"] == rewind
        for r in (1, 2):
            folder = sub / arm / f"round-{r}"
            entry, mask = reference.entries[folder], torch.load(folder / "mask.pt")
            assert entry["start_epoch"] == rewind and entry["data_seed"] == 0
            for name, value in point["model"].items():
                expected = value * mask[name] if name in mask else value
                assert torch.equal(entry["state"]["model"][name], expected), (arm, r, name)
            momenta = {k: v["momentum_buffer"] for k, v in entry["state"]["optimizer"]["state"].items()}
            saved = {k: v["momentum_buffer"] for k, v in point["optimizer"]["state"].items()}
            assert momenta.keys() == saved.keys() and (rewind == 0) == (not saved)  # momentum exists after epoch 1
            assert all(torch.equal(momenta[k], saved[k]) for k in saved)
            epochs = pd.read_csv(folder / "metrics.csv").epoch
            assert sorted(set(epochs)) == list(range(rewind + 1, 3)), (arm, r)


def test_finished_rounds_are_skipped(reference, tiny_dataset, monkeypatch, capsys):
    student, out = reference.student, reference.out
    monkeypatch.setattr(SupervisedTrainer, "step", lambda *a: pytest.fail("a finished round was retrained"))
    before = pd.read_csv(out / "imp_table.csv")
    assert imp_script.main(imp_args(student, tiny_dataset, out)) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "imp_table.csv"), before)


def test_sigterm_mid_round_then_rerun_is_bit_identical(reference, tiny_dataset, tmp_path, monkeypatch, capsys):
    student, ref_out = reference.student, reference.out
    out = tmp_path / "run"
    original, calls = SupervisedTrainer.step, {"n": 0}

    def step(self, *args):
        loss = original(self, *args)
        calls["n"] += 1
        if calls["n"] == 8 + 8 + 3:  # dense student (8 steps), round 1 (8), then 3 steps into round 2
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(SupervisedTrainer, "step", step)
    assert imp_script.main(imp_args(student, tiny_dataset, out)) == 128 + signal.SIGTERM
    assert "SIGTERM received" in capsys.readouterr().out
    (sub,) = student_folders(out)
    assert list((sub / "seed-0" / "student-l0" / "round-2" / "checkpoints").iterdir())
    counted = {"n": 0}

    def counting_step(self, *args):
        counted["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(SupervisedTrainer, "step", counting_step)
    # --overwrite with the same students and settings resumes (a requeued --overwrite job must not restart)
    assert imp_script.main(imp_args(student, tiny_dataset, out, "--overwrite")) == 0
    assert counted["n"] == 56 - 19  # all 56 steps of the run but the 19 done before the signal
    got, want = finals(out), finals(ref_out)
    assert got.keys() == want.keys() and len(got) == 2 + 3 * 2
    for path in want:
        assert all(torch.equal(got[path][k], v) for k, v in want[path].items()), path
    pd.testing.assert_frame_equal(pd.read_csv(out / "imp_table.csv"), pd.read_csv(ref_out / "imp_table.csv"))
    resumed = sub / "seed-0" / "student-l0" / "round-2"
    masks = torch.load(resumed / "mask.pt")
    assert all((got[str((resumed / "final.pt").relative_to(out))][n][~m] == 0).all() for n, m in masks.items())


def test_a_dense_run_that_starts_from_scratch_deletes_stale_rewind_points(reference, tiny_dataset, tmp_path,
                                                                           monkeypatch):
    """Killed before its first checkpoint (no SIGTERM: e.g. out of memory), the dense run restarts from scratch;
    a rewind point the killed attempt saved must not survive into the new run (here it is made visibly wrong)."""
    out = tmp_path / "run"
    args = imp_args(reference.student, tiny_dataset, out, "--dense-only", "--starts", "init")
    original, calls = SupervisedTrainer.step, {"n": 0}

    def dying_step(self, *a):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 1 (4 steps) finished and its rewind point saved; no checkpoint yet
            raise RuntimeError("killed")
        return original(self, *a)

    monkeypatch.setattr(SupervisedTrainer, "step", dying_step)
    with pytest.raises(RuntimeError, match="killed"):
        imp_script.main(args)
    monkeypatch.setattr(SupervisedTrainer, "step", original)
    (sub,) = student_folders(out)
    stale = sub / "seed-0" / "init" / "round-0" / "rewind" / "epoch-1.pt"
    state = torch.load(stale, weights_only=False)
    torch.save({**state, "model": {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}},
               stale)
    assert imp_script.main(args) == 0
    rewound = torch.load(stale, weights_only=False)["model"]
    want = torch.load(reference.sub / "seed-0" / "init" / "round-0" / "rewind" / "epoch-1.pt",
                      weights_only=False)["model"]
    assert all(torch.equal(rewound[k], v) for k, v in want.items())


# ------------------------------------------------------------------------- fingerprints and several students
@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("other") / "other", alpha=0.7)


@pytest.mark.parametrize("change,flag,words", [
    ("student", "--student", "from a different student (weights hash"),
    (["--prune-fraction", "0.3"], "--prune-fraction", "was made with 0.2, asked 0.3"),
    (["--epochs", "3"], "--epochs", "was made with 2, asked 3"),
    (["--lr", "0.05"], "--lr", "was made with 0.1, asked 0.05"),
    (["--lr", "0.05", "--weight-decay", "0"], "--lr", "also differ: --weight-decay"),
])
def test_another_student_or_other_settings_are_refused_and_change_nothing(change, flag, words, reference,
                                                                          other_student, tiny_dataset,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr("utils.data.load_dataset", lambda *a, **k: pytest.fail("data loaded before the check"))
    out = reference.out
    before = snapshot(out)
    argv = imp_args(other_student, tiny_dataset, out) if change == "student" else \
        imp_args(reference.student, tiny_dataset, out, *change)
    with pytest.raises(SystemExit) as exit_info:
        imp_script.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: argument {flag}: {out} was made ") and words in err[0], err
    assert "--overwrite" in err[0]
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def two_students(reference, other_student, tiny_dataset, tmp_path_factory):
    """Two students x seeds 0 and 1, the student start only, one pruning round."""
    out = tmp_path_factory.mktemp("two") / "run"
    argv = ["--student", str(reference.student), str(other_student), "--dataset", str(tiny_dataset), "--output-dir",
            str(out), *TINY_RECIPE, "--epochs", "1", "--lr-milestones", "--rounds", "1", "--starts", "student",
            "--rewind-epochs", "0",
            "--seeds", "0", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_TEACHERS_CACHE", str(out.parent / "cache"))
        assert imp_script.main(argv) == 0
    return argv, out


def test_two_students_aggregate_to_the_mean_and_std_over_every_student_and_seed(two_students):
    _, out = two_students
    subs = student_folders(out)
    assert len(subs) == 2 and all((s / "imp_table.csv").exists() and (s / "imp.png").exists() for s in subs)
    rows = pd.concat([pd.read_csv(s / "imp_table.csv") for s in subs])
    summary = pd.read_csv(out / "imp_summary.csv")
    assert len(summary) == 2  # rounds 0 and 1 of the one arm
    for _, got in summary.iterrows():
        runs = rows[(rows.start == got.start) & (rows["round"] == got["round"])]
        assert len(runs) == got.runs == 4 and got.students == 2  # 2 students x 2 seeds
        for metric in ("best", "final"):
            values = [100 * v for v in runs[f"{metric}_accuracy"]]
            assert got[f"{metric}_mean"] == pytest.approx(statistics.mean(values), abs=1e-9)
            assert got[f"{metric}_std"] == pytest.approx(statistics.stdev(values), abs=1e-9)
    pd.testing.assert_frame_equal(pd.read_csv(out / "imp_table.csv").sort_values(["student", "seed", "round"])
                                  .reset_index(drop=True),
                                  rows.sort_values(["student", "seed", "round"]).reset_index(drop=True))


def test_overwrite_deletes_nothing_before_the_new_run_is_ready_and_then_replaces_the_folder(
        two_students, reference, tiny_dataset, monkeypatch, capsys):
    argv, out = two_students
    before = snapshot(out)
    one = imp_args(reference.student, tiny_dataset, out, "--overwrite", "--starts", "student", "--rounds", "1",
                   "--rewind-epochs", "0", "--epochs", "1", "--lr-milestones")

    def no_data(*a, **k):
        raise UsageError("--dataset", "unreadable")

    monkeypatch.setattr("utils.data.load_dataset", no_data)
    with pytest.raises(SystemExit):
        imp_script.main(one)
    assert snapshot(out) == before
    monkeypatch.undo()
    assert imp_script.main(one) == 0
    (sub,) = student_folders(out)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["configs", sub.name]
    assert pd.read_csv(out / "imp_table.csv")["round"].tolist() == [0, 1]  # the one student's, made anew
    assert json.loads((out / "fingerprint.json").read_text())["defines"]["--epochs"] == 1
# ------------------------------------------------------------------------------------ the lr schedule's flags
@pytest.mark.parametrize("epochs,milestones", [(160, (80, 120)), (2, (1,)), (4, (2, 3)), (10, (5, 7)), (1, ())])
def test_lr_milestones_default_to_the_papers_fractions_of_the_epochs(epochs, milestones):
    args = imp_script.parse_args(["--student", "S", "--epochs", str(epochs), "--rewind-epochs", "0"])
    assert args.recipe.lr_milestones == milestones
    lrs = [args.recipe.lr_at(e) for e in range(1, epochs + 1)]
    assert lrs[0] == 0.1 and sorted(set(lrs), reverse=True) == pytest.approx([0.1 * 0.1 ** k
                                                                               for k in range(len(milestones) + 1)])


@pytest.mark.parametrize("extra,flag,words", [
    (["--epochs", "2", "--lr-milestones", "80", "120"], "--lr-milestones", "milestone 80 is not before --epochs 2"),
    (["--epochs", "0"], "--epochs", ">= 1"), (["--lr", "0"], "--lr", "> 0"),
    (["--momentum", "1.5"], "--momentum", "<= 1"),
    (["--rounds", "-1"], "--rounds", ">= 1"), (["--seeds", "x"], "--seeds", "integer"),
])
def test_recipe_flags_are_checked_while_parsing(extra, flag, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        imp_script.main(["--student", "S", "--rewind-epochs", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and flag in err[0] and words in err[0], err


def test_recipe_flags_show_help_and_defaults():
    text = subprocess.run([sys.executable, "imp.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    flat = " ".join(text.split("supervised SGD recipe", 1)[1].split())
    for flag, default in (("--epochs EPOCHS", "160"), ("--lr LR", "0.1"), ("--momentum MOMENTUM", "0.9")):
        help_text = flat.split(flag, 1)[1].split(" --", 1)[0]
        assert len(help_text) > 20 and f"(default: {default})" in help_text, (flag, help_text)
    assert "50 % and 75 % of --epochs" in flat


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,flag", [
    (["--student", "/nonexistent/student"], "--student"),
    (["--student", "S", "--prune-fraction", "1"], "--prune-fraction"),
    (["--student", "S", "--prune-fraction", "0"], "--prune-fraction"),
    (["--student", "S", "--epochs", "3", "--rewind-epochs", "3"], "--rewind-epochs"),
    (["--dataset", "digits"], "--student"),
])
def test_bad_input_is_one_line_naming_the_flag_before_any_data(extra, flag, reference, monkeypatch, capsys):
    student = reference.student
    monkeypatch.setattr("utils.data.load_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    with pytest.raises(SystemExit) as exit_info:
        imp_script.main([str(student) if a == "S" else a for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and flag in err[0], err


def test_a_student_that_does_not_load_is_one_line_in_a_real_process(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model": "resnet18", "width": 0.125}))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    env = dict(os.environ, HF_HUB_OFFLINE="1", RANDOM_TEACHERS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "imp.py", "--student", str(broken), "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "--student" in lines[0] and "does not load" in lines[0], lines


def test_push_to_hub_sends_the_tables_and_figure_through_the_single_seam(reference, fake_hub, capsys):
    out = reference.out
    assert imp_script.main(["--report-only", "--output-dir", str(out), "--push-to-hub", "me/imp"]) == 0
    (commit,) = fake_hub.commits
    repo, paths = commit["repo_id"], sorted(commit["files"])
    names = {p.split("/", 2)[2] for p in paths}
    assert repo == "me/imp" and all(p.startswith("imp/") for p in paths)
    assert names == {"imp_table.csv", "imp_table.parquet", "imp_summary.csv", "imp_summary.parquet", "imp.png"}
