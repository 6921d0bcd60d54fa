"""--report-to (utils/tracking.py): what the trackers receive is exactly metrics.csv (same metrics, steps and
values, one point per step) also across a SIGTERM and a resume; the tracker names are Accelerate's; a bad or
uninstalled tracker is one line before torch is imported. Offline, with TensorBoard's own event reader."""
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

import train_distill
import utils.tracking
from supervised_helpers import TINY_RECIPE, NoSignal, save_tiny_student, tiny_trainer
from test_resume import FLAT, Steps, argv, interrupt
from utils.tracking import TRACKERS, RunTracker, flat_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lmc_script", ROOT / "lmc.py")
lmc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lmc)


def raw_scalars(logdir: Path) -> list[tuple[str, int, float]]:
    """Every scalar event of the run's event files (not the hparams sub-folders), in the order written."""
    def written(path):  # events.out.tfevents.<time>.<host>.<pid>.<writer number>
        return int(path.name.split(".")[3]), int(path.name.split(".")[-1])

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*"), key=written):
        for event in LegacyEventFileLoader(str(path)).Load():
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value if v.HasField("simple_value")]
    return out


def shown_scalars(logdir: Path) -> list[tuple[str, int, float]]:
    """What TensorBoard shows (its accumulator drops what a resumed run's purge step discards)."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def csv_scalars(metrics_csv: Path) -> list[tuple[str, int, float]]:
    """metrics.csv rows as TensorBoard stores them (32-bit floats)."""
    df = pd.read_csv(metrics_csv)
    return [(m, int(s), float(np.float32(v))) for m, s, v in zip(df.metric, df.step, df.value)]


def assert_same_scalars(logdir: Path, metrics_csv: Path) -> None:
    want = sorted(csv_scalars(metrics_csv))
    raw = raw_scalars(logdir)
    assert len({(t, s) for t, s, _ in raw}) == len(raw), "a (metric, step) was logged twice"
    assert sorted(raw) == want
    assert sorted(shown_scalars(logdir)) == want


# ------------------------------------------------------------------------------------------ train_distill.py
def test_tensorboard_holds_metrics_csv_across_sigterm_and_resume(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out, "--report-to", "tensorboard", "--log-dynamics")
    interrupt(args, 6)  # mid-epoch 2 of 3
    first = raw_scalars(out / "tensorboard")
    assert first and max(s for _, s, _ in first) == 6
    time.sleep(1.1)  # TensorBoard orders event files by their names' creation second, as for two real processes
    with Steps() as s:
        assert train_distill.main(args) == 0
    assert s.calls == 12 - 6
    assert_same_scalars(out / "tensorboard", out / "metrics.csv")
    tags = {t for t, _, _ in first}  # loss, KL, probes and the dynamics all reach the tracker
    assert {"train/kl", "train/ce", "train/loss", "student/knn/test", "teacher/linear/test"} <= tags
    assert any(t.startswith("dynamics/") for t in tags)
    hparams = [yaml.safe_load(p.read_text()) for p in (out / "tensorboard").glob("*/hparams.yml")]
    assert len(hparams) == 2 and all(h["alpha"] == 0.5 and h["architecture/model"] == "flatten" for h in hparams)
    assert hparams[0]["run_id"] == hparams[1]["run_id"]  # the resumed run continues the same tracker run


def test_a_resume_discards_what_was_logged_after_its_checkpoint(tmp_path):
    """A process killed after its last checkpoint has logged steps the resumption logs again: TensorBoard is
    told to drop the first copies (purge step), so each step is shown once, with the resumed run's value."""
    first = RunTracker(["tensorboard"], tmp_path, "run-1", {"a": 1})
    for step in range(1, 6):
        first.log({"x": float(step)}, step)
    first.finish()  # killed at step 5; its last checkpoint was at step 3
    time.sleep(1.1)  # TensorBoard orders event files by their names' creation second, as for two real processes
    resumed = RunTracker(["tensorboard"], tmp_path, "run-1", {"a": 1}, resume_step=3)
    for step in range(4, 8):
        resumed.log({"x": 10.0 * step}, step)
    resumed.finish()
    assert shown_scalars(tmp_path / "tensorboard") == [("x", s, float(s if s <= 3 else 10 * s)) for s in range(1, 8)]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records every init, config update, log and finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.configs, self.finished = [], [], [], 0
        self.config = types.SimpleNamespace(update=lambda values, **kw: self.configs.append(values))

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logged += [(k, step, v) for k, v in values.items()]

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_run_id_is_stable_across_a_resume_and_new_after_starting_over(tiny_dataset, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(utils.tracking, "installed", lambda module: True)
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out, "--report-to", "wandb", "--tracker-project", "rt-tests")
    interrupt(args, 6)
    with Steps():
        assert train_distill.main(args) == 0
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    assert [(i["project"], i["name"], i["resume"]) for i in fake.inits] == [("rt-tests", run_id, "allow")] * 2
    assert fake.inits[0]["id"] == fake.inits[1]["id"] and fake.finished == 2
    assert all(c["run_id"] == run_id and c["alpha"] == 0.5 for c in fake.configs)
    assert sorted((k, s, v) for k, s, v in fake.logged) == sorted(
        (m, int(s), float(v)) for m, s, v in pd.read_csv(out / "metrics.csv")[["metric", "step", "value"]].values)
    with Steps():  # started over: another run, so another tracker run
        assert train_distill.main(args + ["--overwrite", "--epochs", "1"]) == 0
    assert fake.inits[2]["id"] != fake.inits[0]["id"]


def test_config_becomes_flat_hyperparameters():
    assert flat_config({"a": 1, "b": {"c": None, "d": [1, 2]}, "e": "x", "f": True}) == \
        {"a": 1, "b/c": "null", "b/d": "[1, 2]", "e": "x", "f": True}


# ------------------------------------------------------------------------------------- imp.py / lmc.py
class StopAfter:
    """A stand-in for the preemption signal that arrives after `steps` SGD steps."""

    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.calls = trainer, steps, 0
        original = trainer.step

        def step(*args):
            self.calls += 1
            return original(*args)

        trainer.step = step

    @property
    def received(self):
        return "SIGTERM" if self.calls >= self.steps else None


def test_supervised_run_reports_its_metrics_across_a_stop_and_resume(tmp_path):
    trainer = tiny_trainer(epochs=3)
    start = trainer.state()
    report = (SimpleArgs(["tensorboard"]), tmp_path, {"lr": 0.1}, "imp-tiny-1")
    trainer.report = report
    folder = tmp_path / "seed-0" / "student" / "round-0"
    assert trainer.train(folder, 0, 0, StopAfter(trainer, 5)) is None  # 3 steps per epoch: mid-epoch 2
    time.sleep(1.1)  # event files are ordered by their creation second, as for two real processes
    trainer.load_state(start)  # the script's rerun: a fresh process, the same start; the checkpoint restores it
    trainer.report = report
    assert trainer.train(folder, 0, 0, NoSignal()) is not None
    assert_same_scalars(folder / "tensorboard", folder / "metrics.csv")
    assert {t for t, _, _ in raw_scalars(folder / "tensorboard")} == {"train/loss", "lr", "test/accuracy"}
    hparams = [yaml.safe_load(p.read_text()) for p in (folder / "tensorboard").glob("*/hparams.yml")]
    assert [h["run_folder"] for h in hparams] == ["seed-0/student/round-0"] * 2 and hparams[0]["lr"] == 0.1


class SimpleArgs:
    def __init__(self, report_to):
        self.report_to, self.tracker_project = report_to, "random-teachers"


def test_lmc_reports_each_copy_as_its_own_run(tiny_dataset, tmp_path):
    student = save_tiny_student(tmp_path / "student")
    out = tmp_path / "lmc"
    assert lmc.main(["--student", str(student), "--dataset", str(tiny_dataset), "--output-dir", str(out),
                     *TINY_RECIPE, "--epochs", "1", "--lr-milestones", "--copies", "2", "--gammas", "3",
                     "--bn", "interpolate", "--bn-subset", "128", "--starts", "student",
                     "--report-to", "tensorboard"]) == 0
    copies = sorted(p.parent for p in out.rglob("metrics.csv"))
    (sub,) = [p for p in out.iterdir() if p.is_dir() and (p / "fingerprint.json").exists()]  # <name>-<hash>
    assert [p.relative_to(sub).as_posix() for p in copies] == ["student/copy-0", "student/copy-1"]
    for copy in copies:
        assert_same_scalars(copy / "tensorboard", copy / "metrics.csv")


# ------------------------------------------------------------------------------------------------ the flag
def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {str(t) for t in LoggerType} - {"all"}


@pytest.mark.parametrize("script", ["train_distill.py", "imp.py", "lmc.py"])
def test_unknown_or_uninstalled_tracker_is_one_line_before_torch(script):
    missing = next((n for n, (module, _) in TRACKERS.items() if importlib.util.find_spec(module) is None), None)
    code = ("import runpy, sys\nsys.argv = ['{script}', '--report-to', {name!r}]\ntry:\n"
            "    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'accelerate' in sys.modules)\n")
    cases = [("nonsense", "unknown tracker 'nonsense'")]
    cases += [(missing, f"{missing} is not installed; pip install {TRACKERS[missing][1]}")] if missing else []
    for name, says in cases:
        done = subprocess.run([sys.executable, "-c", code.format(script=script, name=name)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and "--report-to" in err[0] and says in err[0], err
