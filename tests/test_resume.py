"""Never lose a run: checkpoints on SIGTERM / SIGUSR1, exact (bitwise on CPU) resumption, corrupt or incomplete
checkpoints skipped with a warning, and the --resume / --overwrite / changed-argument rules.

The interruptions are real signals: `DistillStep.__call__` is wrapped so that after its k-th call the process
sends itself SIGTERM (or SIGUSR1); the script's handler must turn that into a checkpoint and exit code 128+signum.
"""
import hashlib
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_distill
from conftest import TINY_RUN
from utils.checkpoint import (MANIFEST, RUN_STATE, list_checkpoints, load_latest_checkpoint, save_checkpoint,
                              verify_checkpoint)
from utils.distill import DistillStep


# 256 images, batch 64: 4 steps per epoch, 12 steps. alpha = 0.5 so gradients are genuine (near alpha = 0 they are
# round-off sized, and Adam would amplify any round-off difference into a full step; see test_training.py).
VGG = TINY_RUN + ["--alpha", "0.5", "--epochs", "3", "--checkpoint-every", "1"]
# The same schedule on the pixel-input network: every resume code path (optimizer state, RNG, data order, metric
# rows, probing, teacher cache) at a fraction of the cost, for the many variations below.
FLAT = VGG + ["--model", "flatten"]
STEPS_PER_EPOCH, TOTAL = 4, 12


def argv(base, dataset, out, *extra):
    return base + ["--dataset", str(dataset), "--output-dir", str(out), *map(str, extra)]


def step_of(path) -> int:
    return int(path.name.split("-")[-1])


def steps(out) -> list[int]:
    return [step_of(p) for p in list_checkpoints(out / "checkpoints")]


class Steps:
    """Counts DistillStep calls; optionally sends this process `sig` right after the `interrupt_after`-th call."""

    def __init__(self, interrupt_after: int | None = None, sig=signal.SIGTERM, on_first=None):
        self.interrupt_after, self.sig, self.on_first, self.calls = interrupt_after, sig, on_first, 0

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        original = DistillStep.__call__

        def wrapped(step_self, idx, global_batch, **kwargs):
            if self.calls == 0 and self.on_first is not None:
                self.on_first()
            result = original(step_self, idx, global_batch, **kwargs)
            self.calls += 1
            if self.calls == self.interrupt_after:
                # never deliver a signal that would kill the test process: the script must have a handler installed
                handler = signal.getsignal(self.sig)
                if handler in (signal.SIG_DFL, signal.SIG_IGN, None):
                    raise AssertionError(f"no {self.sig.name} handler installed during training")
                os.kill(os.getpid(), self.sig)
            return result

        self.mp.setattr(DistillStep, "__call__", wrapped)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def run_to_end(args) -> int:
    with Steps() as s:
        assert train_distill.main(args) == 0
    return s.calls


def interrupt(args, k, sig=signal.SIGTERM) -> None:
    handler_before = signal.getsignal(sig)
    with Steps(interrupt_after=k, sig=sig) as s:
        assert train_distill.main(args) == 128 + sig
    assert s.calls == k
    assert signal.getsignal(sig) == handler_before, "the script did not restore the previous signal handler"


def assert_same_run(reference, out) -> None:
    """Bitwise-identical student tensors and byte-identical metric tables."""
    wa, wb = (load_file(str(d / "student" / "model.safetensors")) for d in (reference, out))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"student tensors differ from the uninterrupted run: {different[:5]}"
    for name in ("metrics.csv", "probe_table.csv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert sa["probes"] == sb["probes"] and sa["steps"] == sb["steps"] == TOTAL


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """Uninterrupted runs, made once per module on demand: reference('vgg') / reference('flat')."""
    made = {}

    def get(kind: str):
        if kind not in made:
            tmp = tmp_path_factory.mktemp(f"reference-{kind}")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("RANDOM_TEACHERS_CACHE", str(tmp / "cache"))
                assert run_to_end(argv(VGG if kind == "vgg" else FLAT, tiny_dataset, tmp / "run")) == TOTAL
            made[kind] = tmp / "run"
        return made[kind]

    return get


# ------------------------------------------------------------------------------- 1. exact resume after a signal
def test_sigterm_mid_epoch_then_rerun_resumes_bitwise(reference, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(VGG, tiny_dataset, out)
    k = 6  # the middle of epoch 2
    interrupt(args, k)
    said = capsys.readouterr().out
    assert "SIGTERM received" in said and "rerun the same command" in said
    # the epoch-1 checkpoint and the one the signal wrote; nothing half-written; no results yet
    assert steps(out) == [k, STEPS_PER_EPOCH]
    newest = list_checkpoints(out / "checkpoints")[0]
    assert newest.name == f"step-{k:09d}" and (newest / MANIFEST).is_file()
    assert verify_checkpoint(newest) is None
    state = torch.load(newest / RUN_STATE, weights_only=False)
    assert (state["epoch"], state["batch"], state["step"]) == (2, k - STEPS_PER_EPOCH, k)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert not (out / "summary.json").exists() and not (out / "student").exists()
    run_id = json.loads((out / "config.json").read_text())["run_id"]

    # the same command again: resumes automatically (no --resume) and runs only the remaining steps
    assert run_to_end(args) == TOTAL - k
    said = capsys.readouterr().out
    assert "resuming" in said and newest.name in said
    assert json.loads((out / "config.json").read_text())["run_id"] == run_id
    assert json.loads((out / "summary.json").read_text())["run_id"] == run_id
    assert_same_run(reference("vgg"), out)


@pytest.mark.parametrize("sig,k", [(signal.SIGUSR1, 3), (signal.SIGTERM, STEPS_PER_EPOCH), (signal.SIGTERM, TOTAL)],
                         ids=["sigusr1-mid-epoch-1", "sigterm-last-step-of-epoch-1", "sigterm-last-step-of-run"])
def test_signal_resume_variants(sig, k, reference, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out)
    interrupt(args, k, sig)  # SIGUSR1 -> 138, SIGTERM -> 143
    assert f"{sig.name} received" in capsys.readouterr().out
    assert steps(out)[0] == k and verify_checkpoint(list_checkpoints(out / "checkpoints")[0]) is None
    assert not (out / "summary.json").exists()
    assert run_to_end(args) == TOTAL - k
    assert "resuming" in capsys.readouterr().out
    assert_same_run(reference("flat"), out)


def test_signal_handlers_are_restored_when_training_fails(tiny_dataset, tmp_path, monkeypatch):
    """main() runs in-process (tests, notebooks): an exception mid-training must not leave SIGTERM / SIGUSR1
    swallowed by the run's handler for the rest of the process."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    original = DistillStep.__call__

    def failing(self, idx, global_batch, **kwargs):
        if self.optimizer.state:  # the second step
            raise RuntimeError("simulated failure mid-training")
        return original(self, idx, global_batch, **kwargs)

    monkeypatch.setattr(DistillStep, "__call__", failing)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            train_distill.main(argv(FLAT, tiny_dataset, tmp_path / "run"))
        left = {s: signal.getsignal(s) for s in before}
    finally:
        for s, handler in before.items():  # whatever happened, do not leave the test process deaf to SIGTERM
            signal.signal(s, handler)
    assert left == before, "the run's signal handlers are still installed after the exception"


# ----------------------------------------------------------------------- 2. corrupt or incomplete checkpoints
def truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bytes(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 64, len(data)):  # tensor data (the header is at the start): same size, wrong values
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def remove_manifest(path):
    (path / MANIFEST).unlink()  # what a crash between the state files and the manifest would look like


def unloadable(path):
    """Checksums fine, load fails: a tensor is missing, and the manifest was rewritten to match."""
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(f))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["model.safetensors"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,reason", [(truncate, "checksum"), (flip_bytes, "checksum"),
                                          (remove_manifest, "no manifest"), (unloadable, "loading failed")],
                         ids=["truncated", "flipped-bytes", "no-manifest", "load-fails"])
def test_damaged_newest_checkpoint_falls_back_to_previous(damage, reason, reference, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out)
    interrupt(args, 6)
    assert steps(out) == [6, 4]
    newest = list_checkpoints(out / "checkpoints")[0]
    damage(newest)
    if damage is not unloadable:
        assert verify_checkpoint(newest) is not None
    # a leftover temporary folder (a crash mid-save) is never taken for a checkpoint
    (out / "checkpoints" / ".tmp-step-000000007").mkdir()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping checkpoint") as record:
        calls = run_to_end(args)
    skipped = [str(w.message) for w in record if "skipping checkpoint" in str(w.message)]
    assert len(skipped) == 1 and newest.name in skipped[0] and reason in skipped[0], skipped
    assert calls == TOTAL - 4, "the run did not restart from the previous checkpoint (step 4)"
    assert "resuming" in capsys.readouterr().out
    # replay from step 4 is deterministic: the result is still the uninterrupted run, bit for bit
    assert_same_run(reference("flat"), out)


def test_new_checkpoint_is_not_pruned_in_favour_of_a_newer_corrupt_one(reference, tiny_dataset, tmp_path, capsys):
    """Resumed from step 4 past a corrupt step-6 checkpoint, a new interruption at step 5 must leave step-5 on
    disk (the script says it saved it), even with --keep-checkpoints 1: otherwise the run is lost again."""
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out)
    interrupt(args, 6)
    truncate(list_checkpoints(out / "checkpoints")[0])
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        interrupt(args + ["--keep-checkpoints", "1"], 1)  # resumed at step 4, stopped after step 5
    assert "checkpoint saved" in capsys.readouterr().out
    assert (out / "checkpoints" / f"step-{5:09d}").is_dir(), \
        f"the checkpoint just saved at step 5 was pruned; left: {steps(out)}"
    assert verify_checkpoint(out / "checkpoints" / f"step-{5:09d}") is None
    assert run_to_end(args) == TOTAL - 5
    assert_same_run(reference("flat"), out)


# --------------------------------------------------------------------------- 3. --resume, changes, --overwrite
def one_error_line(capsys, flag) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "distill" not in line]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], lines
    return errors[0]


def test_resume_without_checkpoint_is_a_usage_error(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_distill.main(argv(FLAT, tiny_dataset, out, "--resume"))
    assert exc.value.code == 2
    one_error_line(capsys, "--resume")
    assert not list_checkpoints(out / "checkpoints")


def test_resume_with_only_unloadable_checkpoints_is_a_usage_error(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out)
    interrupt(args, 3)
    truncate(list_checkpoints(out / "checkpoints")[0])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(SystemExit) as exc:
        train_distill.main(args + ["--resume"])
    assert exc.value.code == 2
    one_error_line(capsys, "--resume")


def test_changed_identity_argument_refuses_to_resume(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out)
    interrupt(args, 6)
    manifests = {p.name: (p / MANIFEST).read_bytes() for p in list_checkpoints(out / "checkpoints")}
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    for flag, value in (("--lr", "0.002"), ("--alpha", "0.25"), ("--seed", "1"), ("--model", "vgg11")):
        with pytest.raises(SystemExit) as exc:
            train_distill.main(args + [flag, value])
        assert exc.value.code == 2
        line = one_error_line(capsys, flag)
        assert "--overwrite" in line  # says how to start over
    # nothing was touched by the refused attempts
    assert {p.name: (p / MANIFEST).read_bytes() for p in list_checkpoints(out / "checkpoints")} == manifests
    assert (out / "config.json").read_bytes() == config


def test_overwrite_discards_an_interrupted_run_of_other_arguments(reference, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out)
    interrupt(args + ["--lr", "0.002"], 6)
    old_id = json.loads((out / "config.json").read_text())["run_id"]
    capsys.readouterr()
    seen = {}
    with Steps(on_first=lambda: seen.setdefault("at_first_step", steps(out))) as s:
        assert train_distill.main(args + ["--overwrite"]) == 0
    assert s.calls == TOTAL and seen["at_first_step"] == [], "old checkpoints survived --overwrite"
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["run_id"] != old_id
    assert steps(out) == []  # a finished run removes its checkpoints: student/ and the tables hold it all
    assert_same_run(reference("flat"), out)


def test_interrupted_overwrite_resumes_with_the_printed_command(reference, tiny_dataset, tmp_path, capsys):
    """--overwrite over a finished run, stopped by SIGTERM: the folder holds only the new run, and rerunning the
    same command (--overwrite included, as a requeued Slurm job does) resumes it to the uninterrupted result."""
    out = tmp_path / "run"
    args = argv(FLAT, tiny_dataset, out) + ["--overwrite"]
    assert run_to_end(argv(FLAT, tiny_dataset, out, "--lr", "0.002")) == TOTAL  # an older, different finished run
    (out / "probes" / "digits").mkdir(parents=True)  # and a probe.py result of that old student
    capsys.readouterr()
    interrupt(args, 6)
    message = capsys.readouterr().out
    assert "rerun the same command to resume" in message and "--overwrite" in message
    left = sorted(p.name for p in out.iterdir())
    assert left == ["checkpoints", "config.json", "metrics.csv"], left  # nothing of the old run is mixed in
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    with Steps() as s:
        assert train_distill.main(args) == 0
    assert s.calls == TOTAL - 6 and "resuming" in capsys.readouterr().out
    assert_same_run(reference("flat"), out)


# ---------------------------------------------------------------------------------- 4. utils.checkpoint units
@pytest.fixture
def prepared():
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def fill(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_list_checkpoints_is_numeric_newest_first_and_ignores_others(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    for name in ("step-9", "step-10", "step-000000002", ".tmp-step-000000011", "step-x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-12").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10", "step-9", "step-000000002"]


def test_save_checkpoint_keeps_newest_n_and_leaves_no_temporaries(prepared, tmp_path):
    accelerator, model, _ = prepared
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3, 10, 11):
        fill(model, step)
        path = save_checkpoint(accelerator, folder, step, {"step": step, "rows": []}, keep=2)
        assert path == folder / f"step-{step:09d}" and verify_checkpoint(path) is None
        assert not list(folder.glob(".tmp-*"))
        assert len(list_checkpoints(folder)) == min(2, [1, 2, 3, 10, 11].index(step) + 1)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000010", "step-000000011"]  # 10 < 11 numerically
    newest = folder / "step-000000011"
    manifest = json.loads((newest / MANIFEST).read_text())
    assert set(manifest) == {p.name for p in newest.iterdir()} - {MANIFEST}
    assert {"model.safetensors", RUN_STATE} <= set(manifest)
    # keep=1 keeps just the newest; re-saving an existing step replaces it
    fill(model, 42)
    save_checkpoint(accelerator, folder, 11, {"step": 11, "rows": ["again"]}, keep=1)
    assert [p.name for p in list_checkpoints(folder)] == ["step-000000011"]
    assert torch.load(newest / RUN_STATE, weights_only=False)["rows"] == ["again"]
    assert not list(folder.glob(".tmp-*"))


def test_crash_mid_save_leaves_no_checkpoint_and_is_cleaned_up(prepared, tmp_path, monkeypatch):
    accelerator, model, _ = prepared
    folder = tmp_path / "checkpoints"
    save_checkpoint(accelerator, folder, 1, {"step": 1}, keep=3)
    real_save = accelerator.save_state

    def crash(output_dir, **kw):
        real_save(output_dir, **kw)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(OSError):
        save_checkpoint(accelerator, folder, 2, {"step": 2}, keep=3)
    assert [p.name for p in list_checkpoints(folder)] == ["step-000000001"]  # the half-saved one is invisible
    monkeypatch.setattr(accelerator, "save_state", real_save)
    save_checkpoint(accelerator, folder, 3, {"step": 3}, keep=3)
    assert [step_of(p) for p in list_checkpoints(folder)] == [3, 1]
    assert not list(folder.glob(".tmp-*")), f"stale temporary folders left: {list(folder.glob('.tmp-*'))}"


def test_verify_checkpoint_reasons(prepared, tmp_path):
    accelerator, model, _ = prepared
    path = save_checkpoint(accelerator, tmp_path, 5, {"step": 5}, keep=5)
    assert verify_checkpoint(path) is None
    run_state = (path / RUN_STATE).read_bytes()
    (path / RUN_STATE).write_bytes(run_state[:-1])
    assert "checksum" in verify_checkpoint(path)
    (path / RUN_STATE).write_bytes(run_state)
    assert verify_checkpoint(path) is None
    (path / RUN_STATE).unlink()
    assert "missing" in verify_checkpoint(path)
    (path / RUN_STATE).write_bytes(run_state)
    manifest = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(manifest[: len(manifest) // 2])
    assert "manifest" in verify_checkpoint(path)
    (path / MANIFEST).unlink()
    assert "manifest" in verify_checkpoint(path)


def test_load_latest_checkpoint_falls_back_with_a_warning(prepared, tmp_path):
    accelerator, model, _ = prepared
    for step in (1, 2):
        fill(model, step)
        save_checkpoint(accelerator, tmp_path, step, {"step": step}, keep=5)
    fill(model, 0)
    state = load_latest_checkpoint(accelerator, tmp_path)
    assert state["step"] == 2 and state["checkpoint"].endswith("step-000000002")
    assert all(torch.all(p == 2) for p in model.parameters())

    truncate(tmp_path / "step-000000002")
    fill(model, 0)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-000000002"):
        state = load_latest_checkpoint(accelerator, tmp_path)
    assert state["step"] == 1 and state["checkpoint"].endswith("step-000000001")
    assert all(torch.all(p == 1) for p in model.parameters())

    remove_manifest(tmp_path / "step-000000001")
    with pytest.warns(UserWarning, match="skipping checkpoint") as record:
        assert load_latest_checkpoint(accelerator, tmp_path) is None
    assert len([w for w in record if "skipping checkpoint" in str(w.message)]) == 2
