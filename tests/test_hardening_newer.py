"""imp.py, lmc.py, landscape.py and reproduce.py held to the rule train_distill.py meets: bad input is one line
naming the flag, exit 2 and nothing on disk changed; a diverged supervised run stops with exit 3 and is never
recorded as finished; Ctrl-C (SIGINT) checkpoints like SIGTERM, exits 130 and the same command resumes to the
uninterrupted result; a full disk is one line naming where, whatever the writer raised."""
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import landscape
import lmc
import reproduce
import utils.cli
from conftest import ROOT
from supervised_helpers import TINY_ARCH, TINY_RECIPE, save_tiny_student
from test_hardening import snapshot
from utils.checkpoint import list_checkpoints, save_checkpoint
from utils.cli import main_guard, writing_to
from utils.landscape import PointEvaluator
from utils.models import make_teacher_student
from utils.results import atomic_path, write_json
from utils.supervised import SupervisedTrainer, epoch_augmentation

_spec = importlib.util.spec_from_file_location("imp_script", ROOT / "imp.py")  # not the stdlib's `imp`
imp_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imp_script)

SCRIPTS = {"imp": imp_script.main, "lmc": lmc.main, "landscape": landscape.main, "reproduce": reproduce.main}
BIG = "99999999999999999"  # beyond torch's seed range (2**64 - 1) once combined with an epoch


def one_error_line(main, args, capsys, code=2, progress=("seed ", "student ", "init ", "landscape")) -> str:
    """Exit `code`, exactly one stderr line (progress bars aside) starting with `error:`, and no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not x.startswith(progress)]
    assert exc.value.code == code, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A working folder holding a save_pretrained student, a finished train_distill.py run folder (its student/
    and config.json), a non-checkpoint file, a pickle that runs code when loaded, and another architecture's
    supervised checkpoint."""
    root = tmp_path_factory.mktemp("place")
    save_tiny_student(root / "student")
    save_tiny_student(root / "run" / "student")
    (root / "run" / "config.json").write_text(json.dumps({"dataset": "digits"}))
    (root / "run" / "summary.json").write_text("{}")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "evil.pt").write_bytes(b"\x80\x04\x95" + b"garbage" * 20)
    torch.save({"model": {"fc.weight": torch.zeros(3, 7)}, "epoch": 0}, root / "other-arch.pt")
    save_tiny_student(root / "seedless")  # e.g. a Hub student: its initialisation cannot be rebuilt
    config = json.loads((root / "seedless" / "config.json").read_text())
    (root / "seedless" / "config.json").write_text(json.dumps(config | {"alpha": None, "student_seed": None,
                                                                         "teacher_seed": None}))
    (root / "lmc-done").mkdir()
    (root / "lmc-done" / "lmc_table.csv").write_text("start\n")
    return root


def run_case(main, args, flag, place, capsys, monkeypatch, words=None) -> str:
    """`args` with {place} filled in, run from `place`: one line naming `flag`, and `place` unchanged."""
    monkeypatch.chdir(place)
    args = [a.format(place=place) for a in args]
    before = snapshot(place)
    line = one_error_line(main, args, capsys)
    assert flag in line, line
    assert words is None or words in line, line
    assert snapshot(place) == before, "a refused command changed the working folder"
    return line


# ------------------------------------------------------------------------------ 1. bad input at parse time
STUDENT = ["--student", "{place}/student", "--dataset", "digits"]
IMP_CASES = {
    # non-finite numbers
    "prune-fraction-nan": (["--prune-fraction", "nan"], "--prune-fraction"),
    "prune-fraction-inf": (["--prune-fraction", "inf"], "--prune-fraction"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    # out of range, and the empty results of --rounds 0 (only the dense round: --dense-only)
    "rounds-0": (["--rounds", "0"], "--rounds"),
    "rounds-negative": (["--rounds", "-1"], "--rounds"),
    "rounds-huge": (["--rounds", "100000"], "--rounds"),
    "prune-fraction-1": (["--prune-fraction", "1"], "--prune-fraction"),
    "rewind-negative": (["--rewind-epochs", "-1"], "--rewind-epochs"),
    "init-rewind-beyond-run": (["--epochs", "4", "--starts", "init"], "--rewind-epochs"),
    # seeds
    "seed-huge": (["--seeds", BIG], "--seeds"),
    "seed-negative": (["--seeds", "0", "-3"], "--seeds"),
    "seed-not-integer": (["--seeds", "1.5"], "--seeds"),
    # results written among a student's files
    "output-is-student": (["--output-dir", "{place}/student"], "--output-dir"),
    "output-inside-student": (["--output-dir", "{place}/student/imp"], "--output-dir"),
    "output-is-run-of-student": (["--student", "{place}/run/student", "--output-dir", "{place}/run"], "--output-dir"),
    "output-inside-run": (["--student", "{place}/run", "--output-dir", "{place}/run/imp"], "--output-dir"),
    # --report-only on what holds no IMP results
    "report-missing": (["--report-only", "--output-dir", "{place}/nothing-here"], "--output-dir"),
    "report-student": (["--report-only", "--output-dir", "{place}/run"], "--output-dir"),
    "report-lmc-folder": (["--report-only", "--output-dir", "{place}/lmc-done"], "--output-dir"),
}


@pytest.mark.parametrize("case", list(IMP_CASES))
def test_imp_bad_input(case, place, capsys, monkeypatch):
    args, flag = IMP_CASES[case]
    monkeypatch.setattr("utils.supervised.load_student", lambda *a, **k: pytest.fail("student loaded first"))
    run_case(imp_script.main, STUDENT + args, flag, place, capsys, monkeypatch)
    assert not (place / "nothing-here").exists()


def test_imp_student_start_is_not_refused_for_the_init_starts_rewind_epochs(place):
    args = imp_script.parse_args(["--student", str(place / "student"), "--epochs", "4", "--starts", "student"])
    assert args.epochs == 4 and imp_script.rewind_points("student", args) == [0]


LMC_CASES = {
    "copies-1": (["--copies", "1"], "--copies"),
    "copies-huge": (["--copies", "100000"], "--copies"),
    "gammas-1": (["--gammas", "1"], "--gammas"),
    "gammas-huge": (["--gammas", "10000000"], "--gammas"),
    "bn-subset-0": (["--bn-subset", "0"], "--bn-subset"),
    "bn-batch-1": (["--bn-batch-size", "1"], "--bn-batch-size"),
    "data-seed-huge": (["--data-seed", BIG], "--data-seed"),
    "data-seed-negative": (["--data-seed", "-1"], "--data-seed"),
    "bn-seed-huge": (["--bn-seed", BIG], "--bn-seed"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    "output-is-student": (["--output-dir", "{place}/student"], "--output-dir"),
    "output-inside-student": (["--output-dir", "{place}/student/lmc"], "--output-dir"),
    "output-is-run-of-student": (["--student", "{place}/run", "--output-dir", "{place}/run"], "--output-dir"),
    "report-missing": (["--report-only", "--output-dir", "{place}/nothing-here"], "--output-dir"),
    "report-student": (["--report-only", "--output-dir", "{place}/student"], "--output-dir"),
    "checkpoint-missing": (["--starts", "checkpoint", "--checkpoint", "{place}/nope.pt"], "--checkpoint"),
}


@pytest.mark.parametrize("case", list(LMC_CASES))
def test_lmc_bad_input(case, place, capsys, monkeypatch):
    args, flag = LMC_CASES[case]
    monkeypatch.setattr("utils.supervised.load_student", lambda *a, **k: pytest.fail("student loaded first"))
    run_case(lmc.main, STUDENT + args, flag, place, capsys, monkeypatch)
    assert not (place / "nothing-here").exists()


POINTS = ["--points", "{place}/student:teacher", "{place}/student:student", "{place}/run"]
LANDSCAPE_CASES = {
    "x-range-inf": (["--x-range", "0", "inf"], "--x-range"),
    "x-range-huge": (["--x-range", "0", "1e300"], "--x-range"),
    "y-range-nan": (["--y-range", "nan", "1"], "--y-range"),
    "y-range-huge-negative": (["--y-range", "-1e30", "0"], "--y-range"),
    "resolution-huge": (["--resolution", "100000"], "--resolution"),
    "resolution-huge-y": (["--resolution", "5", "100000"], "--resolution"),
    "resolution-not-integer": (["--resolution", "2.5"], "--resolution"),
    "margin-inf": (["--margin", "inf"], "--margin"),
    "margin-huge": (["--margin", "1e9"], "--margin"),
    "zoom-zero": (["--zoom", "0"], "--zoom"),
    "zoom-huge": (["--zoom", "1e300"], "--zoom"),
    "subset-seed-huge": (["--subset-seed", BIG], "--subset-seed"),
    "probe-seed-huge": (["--probe-seed", BIG], "--probe-seed"),
    "output-is-a-point": (["--output-dir", "{place}/student"], "--output-dir"),
    "output-inside-a-run": (["--output-dir", "{place}/run/plane"], "--output-dir"),
    "report-missing": (["--report-only", "--output-dir", "{place}/nothing-here"], "--output-dir"),
    "report-student": (["--report-only", "--output-dir", "{place}/run"], "--output-dir"),
}


@pytest.mark.parametrize("case", list(LANDSCAPE_CASES))
def test_landscape_bad_input(case, place, capsys, monkeypatch):
    args, flag = LANDSCAPE_CASES[case]
    monkeypatch.setattr(landscape, "resolve_student", lambda *a, **k: pytest.fail("points loaded first"))
    run_case(landscape.main, POINTS + args, flag, place, capsys, monkeypatch)
    assert not (place / "nothing-here").exists()


REPRODUCE_CASES = {
    "point-negative": (["run", "fig4", "--tiny", "--point", "-1"], "--point"),
    "point-not-integer": (["run", "fig4", "--tiny", "--point", "1e3"], "--point"),
    "point-huge": (["status", "fig4", "--tiny", "--point", BIG], "--point"),
    "runs-is-a-file": (["run", "fig4", "--tiny", "--runs", "{place}/notes.txt"], "--runs"),
}


@pytest.mark.parametrize("case", list(REPRODUCE_CASES))
def test_reproduce_bad_input(case, place, capsys, monkeypatch):
    args, flag = REPRODUCE_CASES[case]
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda *a, **k: pytest.fail("a point was started"))
    run_case(reproduce.main, args, flag, place, capsys, monkeypatch)


def test_a_huge_seed_is_one_line_in_a_real_process_before_torch(tmp_path):
    for script, args in (("imp.py", ["--student", "x", "--seeds", BIG]), ("lmc.py", ["--student", "x", "--data-seed",
                                                                                  BIG]),
                         ("landscape.py", ["--points", "a", "b", "c", "--x-range", "0", "inf"])):
        done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr


# --------------------------------------------------------- 2. wrong input files, found once the data is known
def lmc_args(student, dataset, out, *extra):
    return ["--student", str(student), "--dataset", str(dataset), "--output-dir", str(out), *TINY_RECIPE,
            "--epochs", "1", "--lr-milestones", "--copies", "2", "--gammas", "3", "--bn-subset", "64", "--starts", "student",
            *map(str, extra)]


@pytest.mark.parametrize("what,words", [("notes.txt", "not a supervised state file"),
                                        ("evil.pt", "not a supervised state file"),
                                        ("other-arch.pt", "another architecture"),
                                        ("bn-subset", "--bn-subset")])
def test_a_refused_lmc_command_creates_nothing(what, words, place, tiny_dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lmc"
    extra = ["--bn-subset", "100000"] if what == "bn-subset" else ["--starts", "checkpoint", "--checkpoint",
                                                                    place / what]
    before = snapshot(place)
    args = lmc_args(place / "student", tiny_dataset, out)
    args = args[:args.index("--starts")] + [str(a) for a in extra]
    line = one_error_line(lmc.main, args, capsys)
    assert words in line and len(line) < 400, line
    assert not out.exists() and snapshot(place) == before


def test_a_rewind_point_is_read_without_running_code_and_fits_its_network(tmp_path):
    """What imp.py saves as a rewind point (weights, SGD momentum, epoch) passes the --checkpoint checks as it is."""
    from supervised_helpers import tiny_trainer
    from utils.supervised import check_state_fits, read_supervised_state, save_state_file

    trainer = tiny_trainer()
    batch = torch.arange(16)
    trainer.step(batch, *epoch_augmentation(len(trainer.train_labels), 0, 1, trainer.recipe, "cpu"))
    save_state_file(tmp_path / "epoch-1.pt", trainer.state(), epoch=1)
    state = read_supervised_state(tmp_path / "epoch-1.pt", "--checkpoint")
    assert state["epoch"] == 1 and state["optimizer"]["state"]  # the momentum came along
    check_state_fits(state, trainer.raw, tmp_path / "epoch-1.pt", "--checkpoint")
    assert all(torch.equal(v, trainer.raw.state_dict()[k]) for k, v in state["model"].items())


@pytest.mark.parametrize("script", ["imp", "lmc"])
def test_an_init_start_the_student_cannot_rebuild_creates_nothing(script, place, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    args = lmc_args(place / "seedless", tiny_dataset, out)
    args = args[:args.index("--copies")] + ["--starts", "init"] + (["--rewind-epochs", "0"] if script == "imp" else [])
    line = one_error_line(SCRIPTS[script], args, capsys)
    assert "--student" in line and "initialisation" in line and not out.exists(), line


# --------------------------------------------------------------------------- 3. divergence: exit 3, nothing done
def no_finished_results(out: Path) -> None:
    for name in ("result.json", "final.pt", "imp_table.csv", "lmc_table.csv", "lmc_curves.csv"):
        assert not list(out.rglob(name)), name


@pytest.mark.parametrize("recipe", [["--lr", "inf"], ["--weight-decay", "nan"], ["--lr-decay", "nan"],
                                    ["--lr", "1e30"]])
def test_imp_non_finite_or_exploding_recipe_is_never_recorded_as_finished(recipe, place, tiny_dataset, tmp_path,
                                                                          capsys):
    """Refused while parsing (2, naming the flag) or stopped as diverged (3): never a result.json."""
    out = tmp_path / "imp"
    line = None
    with pytest.raises(SystemExit) as exc:
        imp_script.main(["--student", str(place / "student"), "--dataset", str(tiny_dataset), "--output-dir",
                         str(out), *TINY_RECIPE, "--rounds", "1", "--starts", "student", *recipe])
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error:")]
    line = lines[-1]
    assert exc.value.code in (2, 3) and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert (recipe[0] in line) if exc.value.code == 2 else ("diverged" in line and "non-finite" in line), line
    if out.exists():
        no_finished_results(out)
        assert not list(out.rglob("rewind/epoch-*.pt"))[1:]  # at most the start itself (epoch 0)


def test_lmc_nan_lr_decay_is_never_recorded_as_a_perfect_barrier(place, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "lmc"
    with pytest.raises(SystemExit) as exc:
        lmc.main(lmc_args(place / "student", tiny_dataset, out, "--epochs", "2", "--lr-decay", "nan"))
    err = capsys.readouterr().err
    assert exc.value.code in (2, 3) and "Traceback" not in err, err[-2000:]
    assert "--lr-decay" in err if exc.value.code == 2 else "diverged" in err
    if out.exists():
        no_finished_results(out)


def student_dir(out: Path) -> Path:
    """The one student's subfolder of an imp.py / lmc.py folder (`<name>-<weights hash>`)."""
    (sub,) = [p for p in out.iterdir() if p.is_dir() and (p / "fingerprint.json").exists()]
    return sub


def test_a_run_that_diverges_mid_round_keeps_its_last_good_checkpoint_and_resumes(place, tiny_dataset, tmp_path,
                                                                                  capsys, monkeypatch):
    """A NaN weight after step 6 (epoch 2 of 2, after the epoch-1 checkpoint): exit 3, the step-4 checkpoint
    kept, no result; the same command then resumes from that checkpoint and finishes."""
    out = tmp_path / "imp"
    args = ["--student", str(place / "student"), "--dataset", str(tiny_dataset), "--output-dir", str(out),
            *TINY_RECIPE, "--rounds", "1", "--starts", "student", "--checkpoint-every", "1", "--dense-only"]
    original, calls = SupervisedTrainer.step, []

    def poisoned(self, *a):
        loss = original(self, *a)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                next(self.raw.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(SupervisedTrainer, "step", poisoned)
    line = one_error_line(imp_script.main, args, capsys, code=3)
    folder = student_dir(out) / "seed-0" / "student" / "round-0"
    assert "diverged" in line and "epoch 2" in line and str(folder) in line
    assert [p.name for p in list_checkpoints(folder / "checkpoints")] == ["step-000000004"]
    assert not (folder / "result.json").exists() and not (folder / "final.pt").exists()
    monkeypatch.setattr(SupervisedTrainer, "step", original)
    assert imp_script.main(args) == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["steps"] == 8 and all(torch.isfinite(v).all() for v in torch.load(folder / "final.pt")["model"]
                                        .values() if v.is_floating_point())
    said = capsys.readouterr().out
    assert "imp_table.csv" in said and not (out / "imp_table.csv").exists()  # --dense-only writes no empty table


# ------------------------------------------------------------------------------------ 4. Ctrl-C like SIGTERM
def sigint_after(monkeypatch, cls, name, k):
    """Wrap cls.name so that after its k-th call this process receives SIGINT (a handler must be installed)."""
    original, calls = getattr(cls, name), []

    def wrapped(self, *a, **kw):
        result = original(self, *a, **kw)
        calls.append(1)
        if len(calls) == k:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "no SIGINT handler"
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(cls, name, wrapped)
    return lambda: monkeypatch.setattr(cls, name, original)


def test_ctrl_c_during_train_distill_checkpoints_and_resumes_bitwise(tiny_dataset, tmp_path, capsys, monkeypatch):
    import train_distill
    from conftest import TINY_RUN
    from safetensors.torch import load_file
    from utils.distill import DistillStep

    def args(out):
        return TINY_RUN + ["--model", "flatten", "--alpha", "0.5", "--epochs", "3", "--checkpoint-every", "1",
                           "--dataset", str(tiny_dataset), "--output-dir", str(out)]

    assert train_distill.main(args(tmp_path / "reference")) == 0
    undo = sigint_after(monkeypatch, DistillStep, "__call__", 6)  # epoch 2 of 3, after the epoch-1 checkpoint
    assert train_distill.main(args(tmp_path / "run")) == 130
    assert "SIGINT received" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000000006",
                                                                                    "step-000000004"]
    undo()
    assert train_distill.main(args(tmp_path / "run")) == 0
    got, want = (load_file(str(tmp_path / d / "student" / "model.safetensors")) for d in ("run", "reference"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def finals(out: Path) -> dict:
    return {str(p.relative_to(out)): torch.load(p, weights_only=True)["model"] for p in sorted(out.rglob("final.pt"))}


def test_ctrl_c_during_imp_checkpoints_and_resumes_bit_identically(place, tiny_dataset, tmp_path, capsys,
                                                                   monkeypatch):
    def args(out):
        return ["--student", str(place / "student"), "--dataset", str(tiny_dataset), "--output-dir", str(out),
                *TINY_RECIPE, "--epochs", "1", "--lr-milestones", "--rounds", "1", "--starts", "student"]

    assert imp_script.main(args(tmp_path / "reference")) == 0
    handler = signal.getsignal(signal.SIGINT)
    undo = sigint_after(monkeypatch, SupervisedTrainer, "step", 4 + 2)  # 2 steps into round 1
    assert imp_script.main(args(tmp_path / "run")) == 130
    assert signal.getsignal(signal.SIGINT) == handler
    assert "SIGINT received" in capsys.readouterr().out
    assert list_checkpoints(student_dir(tmp_path / "run") / "seed-0" / "student-l0" / "round-1" / "checkpoints")
    undo()
    assert imp_script.main(args(tmp_path / "run")) == 0
    got, want = finals(tmp_path / "run"), finals(tmp_path / "reference")
    assert got.keys() == want.keys() and len(got) == 2
    assert all(torch.equal(got[p][k], v) for p in want for k, v in want[p].items())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "imp_table.csv"),
                                  pd.read_csv(tmp_path / "reference" / "imp_table.csv"))


def test_ctrl_c_during_lmc_checkpoints_and_resumes_to_the_same_table(place, tiny_dataset, tmp_path, capsys,
                                                                     monkeypatch):
    assert lmc.main(lmc_args(place / "student", tiny_dataset, tmp_path / "reference")) == 0
    undo = sigint_after(monkeypatch, SupervisedTrainer, "step", 4 + 2)  # copy 2, step 2 of 4
    assert lmc.main(lmc_args(place / "student", tiny_dataset, tmp_path / "run")) == 130
    assert list_checkpoints(student_dir(tmp_path / "run") / "student" / "copy-1" / "checkpoints")
    assert not (tmp_path / "run" / "lmc_table.csv").exists()
    undo()
    assert lmc.main(lmc_args(place / "student", tiny_dataset, tmp_path / "run")) == 0
    for name in ("lmc_table.csv", "lmc_curves.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / name), pd.read_csv(tmp_path / "reference" / name))


def test_ctrl_c_during_landscape_keeps_the_finished_chunks_and_resumes(place, tiny_dataset, tmp_path, capsys,
                                                                       monkeypatch):
    _, other = make_teacher_student(TINY_ARCH, teacher_seed=0, student_seed=2, alpha=1.0)
    other.save_pretrained(tmp_path / "other")

    def args(out):
        return ["--points", f"{place / 'student'}:teacher", str(place / "student"), str(tmp_path / "other"),
                "--dataset", str(tiny_dataset), "--train-images", "32", "--test-images", "16", "--batch-size", "16",
                "--probe-epochs", "1", "--knn-k", "5", "--resolution", "2", "--chunk-size", "1", "--output-dir",
                str(out)]

    assert landscape.main(args(tmp_path / "reference")) == 0
    undo = sigint_after(monkeypatch, PointEvaluator, "__call__", 3)
    assert landscape.main(args(tmp_path / "run")) == 130
    assert "SIGINT received" in capsys.readouterr().out
    chunks = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "chunks").iterdir()}
    assert len(chunks) == 2 and not (tmp_path / "run" / "landscape.csv").exists()
    undo()
    assert landscape.main(args(tmp_path / "run")) == 0
    assert all((tmp_path / "run" / "chunks" / n).stat().st_mtime_ns == t for n, t in chunks.items())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "landscape.csv"),
                                  pd.read_csv(tmp_path / "reference" / "landscape.csv"))
    table = pd.read_csv(tmp_path / "run" / "landscape.csv")
    assert table["value"].map(lambda v: v == v and abs(v) != float("inf")).all()  # only finite numbers


# reproduce.py in a real process tree, as a terminal runs it: Ctrl-C goes to the parent's whole process group.
# A sitecustomize in the point's process sends it after its k-th distillation step.
SITE = """
import os, signal
k = int(os.environ.get("CTRL_C_AFTER_STEP", "0"))
if k:
    import utils.distill
    original, calls = utils.distill.DistillStep.__call__, []
    def wrapped(self, *a, **kw):
        out = original(self, *a, **kw)
        calls.append(1)
        if len(calls) == k:
            os.killpg(os.getpgid(os.getppid()), signal.SIGINT)  # the terminal's group: reproduce.py's
        return out
    utils.distill.DistillStep.__call__ = wrapped
"""
DRIVER = """
import sys
from pathlib import Path
import utils.grids, reproduce
utils.grids.GRID_DIR = Path(sys.argv[1])
sys.exit(reproduce.main(["run", "mini", "--point", "0", "--runs", sys.argv[2]]))
"""


CHILD = """
import os, signal, sys, time
received = []
signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
open(sys.argv[1] + ".ready", "w").close()
deadline = time.time() + 60
while not received and time.time() < deadline:
    time.sleep(0.01)
time.sleep(0.5)  # a second copy of the signal would arrive by now
open(sys.argv[1], "w").write(f"{len(received)} {os.getpgrp() == os.getpid()}")
sys.exit(130)
"""


def test_reproduce_forwards_ctrl_c_to_the_running_point_once(tmp_path):
    """The point runs in a process group of its own (a terminal's Ctrl-C reaches only reproduce.py's group) and
    reproduce.py passes SIGINT on once; its status is the point's 130."""
    import threading

    said = tmp_path / "child"

    def press_ctrl_c():
        deadline = time.time() + 60
        while not Path(f"{said}.ready").exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    assert reproduce.call_forwarding_signals([sys.executable, "-c", CHILD, str(said)]) == 130
    assert said.read_text() == "1 True" and signal.getsignal(signal.SIGINT) == handler


@pytest.mark.slow
def test_ctrl_c_during_reproduce_stops_once_without_a_traceback_and_resumes(tiny_dataset, tmp_path):
    from test_reproduce import MINI

    grids, site = tmp_path / "grids", tmp_path / "site"
    grids.mkdir()
    site.mkdir()
    spec = MINI | {"fixed": MINI["fixed"] | {"dataset": str(tiny_dataset), "epochs": 3, "checkpoint_every": 1}}
    (grids / "mini.yaml").write_text(yaml.safe_dump(spec))
    (site / "sitecustomize.py").write_text(SITE)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "RANDOM_TEACHERS_CACHE": str(tmp_path / "cache")}

    def drive(runs, ctrl_c_after=0):
        return subprocess.run([sys.executable, "-c", textwrap.dedent(DRIVER), str(grids), str(runs)], cwd=ROOT,
                              env={**env, "CTRL_C_AFTER_STEP": str(ctrl_c_after)}, capture_output=True, text=True,
                              timeout=300, start_new_session=True)  # its own group, as a terminal's job

    reference = drive(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = drive(tmp_path / "runs", ctrl_c_after=6)  # epoch 2 of 3, after the epoch-1 checkpoint
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stdout.count("SIGINT received") == 1 and "rerun the same command" in stopped.stdout
    (folder,) = (tmp_path / "runs" / "mini").iterdir()
    assert [p.name for p in list_checkpoints(folder / "checkpoints")] == ["step-000000006", "step-000000004"]
    resumed = drive(tmp_path / "runs")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]
    want = tmp_path / "reference" / "mini" / folder.name
    assert (folder / "metrics.csv").read_bytes() == (want / "metrics.csv").read_bytes()
    assert (folder / "student" / "model.safetensors").read_bytes() == \
        (want / "student" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------- 5. a full disk
def disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel reports it: no file name


def test_atomic_writes_name_the_file_whatever_the_writer_raised(tmp_path):
    (tmp_path / "result.json").write_text("old\n")
    for failure in (OSError(errno.ENOSPC, "No space left on device"),
                    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")):
        with pytest.raises(OSError) as exc:
            with atomic_path(tmp_path / "result.json"):
                raise failure
        assert exc.value.filename == str(tmp_path / "result.json") and exc.value.errno == errno.ENOSPC
    with pytest.raises(ValueError):  # not a failed write: a bug, passed on as it is
        with atomic_path(tmp_path / "result.json"):
            raise ValueError("a bug")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and (tmp_path / "result.json").read_text() == "old\n"


def test_a_checkpoint_that_does_not_fit_keeps_the_older_ones_and_says_where(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(4, 3))
    folder = tmp_path / "checkpoints"
    save_checkpoint(accelerator, folder, 1, {"epoch": 1}, keep=2)
    monkeypatch.setattr("utils.checkpoint.torch.save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
    with pytest.raises(OSError) as exc:
        save_checkpoint(accelerator, folder, 2, {"epoch": 2}, keep=2)
    assert exc.value.filename == str(folder) and "older checkpoints are kept" in exc.value.strerror
    assert [p.name for p in folder.iterdir()] == ["step-000000001"]  # no half-written step-2 or .tmp- folder
    del model


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"),
                                    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0"),
                                    Exception("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")])
def test_main_guard_names_the_output_folder_when_the_error_names_no_file(raised, tmp_path, capsys):
    @main_guard
    def main(argv=None):
        writing_to(tmp_path / "out")
        raise raised

    with pytest.raises(SystemExit) as exc:
        main([])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(lines) == 1 and str(tmp_path / "out") in lines[0], lines


def test_main_guard_turns_ctrl_c_outside_a_training_loop_into_one_line_and_130(capsys):
    @main_guard
    def main(argv=None):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        main([])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 130 and len(lines) == 1 and "Ctrl-C" in lines[0]


def test_imp_on_a_full_disk_is_one_line_naming_the_file_and_keeps_the_finished_rounds(place, tiny_dataset, tmp_path,
                                                                                     capsys, monkeypatch):
    """Round 1's final weights do not fit (torch.save's own error on a full disk): one line, exit 1, round 0
    stays finished and the same command, with room again, finishes round 1 only."""
    out = tmp_path / "imp"
    args = ["--student", str(place / "student"), "--dataset", str(tiny_dataset), "--output-dir", str(out),
            *TINY_RECIPE, "--rounds", "1", "--starts", "student"]
    real = torch.save

    def full_for_round_1(obj, path, *a, **k):
        if "round-1" in str(path):
            real(obj, path, *a, **k)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_for_round_1)
    line = one_error_line(imp_script.main, args, capsys, code=1)
    assert str(student_dir(out) / "seed-0" / "student-l0" / "round-1") in line and "no space" in line.lower(), line
    assert (student_dir(out) / "seed-0" / "student" / "round-0" / "result.json").exists()
    assert not (student_dir(out) / "seed-0" / "student-l0" / "round-1" / "result.json").exists()
    monkeypatch.setattr(torch, "save", real)
    assert imp_script.main(args) == 0 and len(pd.read_csv(out / "imp_table.csv")) == 2


def tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk_is_one_line(place, tiny_dataset, tmp_path, capsys):
    """A 160 kB tmpfs, nearly full: lmc.py's first copy's weights do not fit; one line naming where, exit 1, no
    traceback."""
    disk = tmp_path / "disk"
    if not tmpfs(disk, "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "filler").write_bytes(b"\0" * 150_000)
        line = one_error_line(lmc.main, lmc_args(place / "student", tiny_dataset, disk / "lmc"), capsys, code=1)
        assert str(student_dir(disk / "lmc") / "student" / "copy-0") in line and "no space left" in line.lower(), line
        assert not [p for p in (disk / "lmc").rglob("*") if p.name.startswith(".")]  # no temporary left
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: the failed writer may still hold a file


def test_write_json_names_the_file_on_a_failed_write(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as exc:
        write_json(tmp_path / "a" / "result.json", {"x": 1})
    assert exc.value.filename == str(tmp_path / "a" / "result.json")
    assert not list((tmp_path / "a").iterdir())


def test_the_registered_output_folder_is_the_checked_one(tmp_path):
    utils.cli.check_output_dir("--output-dir", tmp_path / "x")
    assert utils.cli._output_folder == [tmp_path / "x"] and not (tmp_path / "x").exists()
