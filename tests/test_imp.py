"""IMP (imp.py, utils/pruning.py) and the shared supervised recipe (utils/supervised.py): exact pruning counts,
smallest-magnitude choice, shrinking masks, pruned weights that stay exactly 0, bit-exact rewinding, a real
SIGTERM mid-round with a bitwise identical rerun, and one-line errors for bad input."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from supervised_helpers import TINY_RECIPE, NoSignal, save_tiny_student, tiny_classifier, tiny_trainer
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
    return ["--student", str(student), "--dataset", str(dataset), "--output-dir", str(out), *TINY_RECIPE,
            "--rounds", "2", "--starts", "student", "init", "--rewind-epochs", "0", "1", *map(str, extra)]


def finals(out: Path) -> dict:
    return {str(p.relative_to(out)): torch.load(p, weights_only=False)["model"] for p in sorted(out.rglob("final.pt"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset):
    """One uninterrupted tiny IMP run (student + init with rewinds 0 and 1, two rounds)."""
    root = tmp_path_factory.mktemp("imp")
    student = save_tiny_student(root / "student")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_TEACHERS_CACHE", str(root / "cache"))
        assert imp_script.main(imp_args(student, tiny_dataset, root / "run")) == 0
    return student, root / "run"


def test_imp_end_to_end_writes_table_masks_and_figure(reference):
    _, out = reference
    table = pd.read_csv(out / "imp_table.csv")
    assert set(map(tuple, table[["start", "rewind_epoch"]].drop_duplicates().values)) == \
        {("student", 0), ("init", 0), ("init", 1)}
    assert table.groupby(["start", "rewind_epoch"]).size().eq(3).all()  # rounds 0, 1, 2
    assert table.weights_remaining.tolist() == pytest.approx([0.8 ** r for r in table["round"]], abs=1e-4)
    assert table.best_accuracy.ge(table.final_accuracy).all()
    assert (out / "imp.png").stat().st_size > 10_000 and (out / "imp_summary.csv").exists()
    round2 = out / "seed-0" / "init-l1" / "round-2"
    report = json.loads((round2 / "sparsity.json").read_text())
    assert set(report["layers"]) == set(torch.load(round2 / "mask.pt"))
    masks, weights = torch.load(round2 / "mask.pt"), torch.load(round2 / "final.pt")["model"]
    assert all((weights[n][~m] == 0).all() for n, m in masks.items())  # still zero after the last SGD step
    assert not any(p.name == "checkpoints" for p in out.rglob("checkpoints"))


def test_finished_rounds_are_skipped(reference, tiny_dataset, monkeypatch, capsys):
    student, out = reference
    monkeypatch.setattr(SupervisedTrainer, "step", lambda *a: pytest.fail("a finished round was retrained"))
    before = pd.read_csv(out / "imp_table.csv")
    assert imp_script.main(imp_args(student, tiny_dataset, out)) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "imp_table.csv"), before)


def test_sigterm_mid_round_then_rerun_is_bit_identical(reference, tiny_dataset, tmp_path, monkeypatch, capsys):
    student, ref_out = reference
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
    assert list((out / "seed-0" / "student-l0" / "round-2" / "checkpoints").iterdir())
    monkeypatch.setattr(SupervisedTrainer, "step", original)
    assert imp_script.main(imp_args(student, tiny_dataset, out)) == 0
    got, want = finals(out), finals(ref_out)
    assert got.keys() == want.keys() and len(got) == 2 + 3 * 2
    for path in want:
        assert all(torch.equal(got[path][k], v) for k, v in want[path].items()), path
    pd.testing.assert_frame_equal(pd.read_csv(out / "imp_table.csv"), pd.read_csv(ref_out / "imp_table.csv"))
    resumed = out / "seed-0" / "student-l0" / "round-2"
    masks = torch.load(resumed / "mask.pt")
    assert all((got[str((resumed / "final.pt").relative_to(out))][n][~m] == 0).all() for n, m in masks.items())


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
    (["--rounds", "-1"], "--rounds", ">= 0"), (["--seeds", "x"], "--seeds", "integer"),
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
    student, _ = reference
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
    _, out = reference
    assert imp_script.main(["--report-only", "--output-dir", str(out), "--push-to-hub", "me/imp"]) == 0
    (commit,) = fake_hub.commits
    repo, paths = commit["repo_id"], sorted(commit["files"])
    names = {p.split("/", 2)[2] for p in paths}
    assert repo == "me/imp" and all(p.startswith("imp/") for p in paths)
    assert names == {"imp_table.csv", "imp_table.parquet", "imp_summary.csv", "imp_summary.parquet", "imp.png"}
