"""Real two-process DDP on CPU (gloo): `torchrun --nproc_per_node 2 train_distill.py` against one process over the
same global batch, and only rank 0 writing into the run folder."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_NET

ROOT = Path(__file__).resolve().parents[1]
# vgg11 has no BatchNorm by default: per-process BN statistics legitimately differ from the global batch's on CPU
# (SyncBatchNorm needs a GPU). alpha = 1: genuine, not round-off-sized, gradients. 150 class-balanced images in
# global batches of 61: 61, 61, 28 per epoch, so the per-rank shares are uneven (31/30) and the last batch is short.
# (--train-subset 200 is impossible on the 256-image fixture: class 2 has only 18 train images there.) 4 epochs =
# 12 steps: past step 10, where the processes agree on stopping after a signal (they check every 10 steps).
N_IMAGES, BATCH, EPOCHS = 150, 61, 4
ARGS = TINY_NET + ["--alpha", "1", "--train-subset", str(N_IMAGES), "--batch-size", str(BATCH), "--epochs",
                   str(EPOCHS), "--probe-every", "0", "--probe-epochs", "2", "--log-every", "1"]

# Records every write-like file-system call that targets the watched folder, one log file per process (RANK).
SITECUSTOMIZE = textwrap.dedent('''
    import builtins, io, os, threading

    _watch = os.path.realpath(os.environ["RT_WATCH_DIR"])
    _log = os.path.join(os.environ["RT_WRITE_LOG_DIR"], "writes-rank%s.log" % os.environ.get("RANK", "launcher"))
    _open, _os_open = io.open, os.open  # originals: the hook writes its own log with these (no recursion)
    _busy = threading.local()

    def _record(kind, path):
        if getattr(_busy, "on", False) or isinstance(path, int):
            return
        _busy.on = True
        try:
            full = os.path.realpath(os.fsdecode(os.fspath(path)))
            if full == _watch or full.startswith(_watch + os.sep):
                with _open(_log, "a") as f:
                    f.write("%s\\t%s\\n" % (kind, full))
        except Exception:
            pass
        finally:
            _busy.on = False

    def _wrap(module, name, test=None, arg=0):
        original = getattr(module, name)
        def wrapper(*args, **kwargs):
            if len(args) > arg and (test is None or test(args, kwargs)):
                _record(name, args[arg])
            return original(*args, **kwargs)
        setattr(module, name, wrapper)

    def _writes(args, kwargs):
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return any(c in str(mode) for c in "wax+")

    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    for _module in (builtins, io):
        _wrap(_module, "open", _writes)
    _wrap(os, "open", lambda a, k: bool((a[1] if len(a) > 1 else k.get("flags", 0)) & _WRITE_FLAGS))
    for _name in ("mkdir", "remove", "unlink", "rmdir"):
        _wrap(os, _name)
    for _name in ("replace", "rename"):
        _wrap(os, _name)
        _wrap(os, _name, arg=1)
    with _open(_log, "a") as f:  # proves the hook is loaded in this process
        f.write("started\\t%d\\n" % os.getpid())
''')


# Sends rank 0 (only) SIGTERM right after its SIGTERM_AFTER-th training step, as a pre-empted node would receive
# it: the processes must agree to stop, checkpoint together and exit; patched in once utils.distill is imported.
SIGTERM_HOOK = textwrap.dedent('''
    import builtins, os, signal, sys
    _import, _state = builtins.__import__, {"calls": 0, "patched": False}

    def _hooked_import(*args, **kwargs):
        module = _import(*args, **kwargs)
        step = getattr(sys.modules.get("utils.distill"), "DistillStep", None)  # once fully imported
        if not _state["patched"] and step is not None:
            _state["patched"] = True
            original = step.__call__

            def call(self, *a, **k):
                result = original(self, *a, **k)
                _state["calls"] += 1
                if _state["calls"] == int(os.environ["SIGTERM_AFTER"]) and os.environ.get("RANK") == "0":
                    os.kill(os.getpid(), signal.SIGTERM)
                return result

            step.__call__ = call
        return module

    builtins.__import__ = _hooked_import
''')
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_distill.py"]


def launch(cmd, dataset: Path, out: Path, tmp: Path, extra_env=None, expect_ok=True):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RANDOM_TEACHERS_CACHE": str(tmp / "cache"), **(extra_env or {})}
    proc = subprocess.run(cmd + ARGS + ["--dataset", str(dataset), "--output-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    if expect_ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """(single-process run folder, two-process run folder, write-log folder)."""
    tmp = tmp_path_factory.mktemp("ddp")
    single, ddp, hook, logs = tmp / "single", tmp / "ddp", tmp / "hook", tmp / "logs"
    hook.mkdir()
    logs.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    launch([sys.executable, "train_distill.py"], tiny_dataset, single, tmp)
    pythonpath = os.pathsep.join([str(hook)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    # `python -m torch.distributed.run` is the `torchrun` entry point, pinned to this interpreter
    launch(TORCHRUN, tiny_dataset, ddp, tmp,
           {"PYTHONPATH": pythonpath, "RT_WATCH_DIR": str(ddp), "RT_WRITE_LOG_DIR": str(logs)})
    return single, ddp, logs


def test_two_processes_match_one_over_the_same_global_batch(runs):
    single, ddp, _ = runs
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (single, ddp))
    assert c1["world_size"] == 1 and c2["world_size"] == 2
    steps = EPOCHS * math.ceil(N_IMAGES / BATCH)
    assert c1["steps"] == c2["steps"] == steps and c1["train_images"] == c2["train_images"] == N_IMAGES

    # Logged training diagnostics are reduced over ranks and divided by the global batch: same numbers per step.
    assert len(train_metrics(single).xs("train/ce", level="metric")) == steps
    assert_two_process_run_matches_one(ddp, single)


def train_metrics(run_dir: Path) -> pd.Series:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df[df.metric.str.startswith("train/")].set_index(["epoch", "step", "metric"]).value.sort_index()


def assert_two_process_run_matches_one(ddp: Path, single: Path):
    """A 2-process run (torchrun here, two Slurm nodes in test_slurm) equals the 1-process run over the same global
    batch, to the round-off that summing two half-batch gradients instead of one full batch allows."""
    m1, m2 = train_metrics(single), train_metrics(ddp)
    assert list(m1.index) == list(m2.index)
    # The Adam step sizes inherit the round-off flips described below (a few elements' full +-lr steps), and so does
    # the embedding norm (up to 5e-5 relative by step 12), so they agree to 1e-3; everything computed from the loss
    # agrees to 2e-4 (seen: 1e-5 on AVX-512 CPUs, 5.1e-5 on an AVX2 one, whose kernels sum in another order) - far
    # inside a real DDP error's 1e-2 (below).
    step_sizes = m1.index.get_level_values("metric").isin(["train/adam_step_norm", "train/eps_damped", "train/grad_norm",
                                                           "train/embedding_norm"])
    torch.testing.assert_close(torch.tensor(m2.values[~step_sizes]), torch.tensor(m1.values[~step_sizes]), rtol=2e-4,
                               atol=1e-6)
    torch.testing.assert_close(torch.tensor(m2.values[step_sizes]), torch.tensor(m1.values[step_sizes]), rtol=1e-3,
                               atol=1e-6)

    # Final student parameters. Summing two half-batch gradients (all-reduce) instead of one full-batch sum changes
    # the float rounding, and Adam divides every update by the gradient's own magnitude: for the rare weights whose
    # gradient is a near-total cancellation (round-off sized), that rounding flips a full +-lr step. Measured on the
    # full-width VGG11: the head agrees to ~1e-7; in the conv weights at most ~0.1% of elements differ by more than
    # 1e-5 (up to ~8e-4), and the difference is ~0.3% of the distance travelled (the tests' quarter-width net, here:
    # no element off, metrics within 3e-6, 1e-6 of the distance). A real DDP error is far larger: averaging
    # per-rank batch means (sample weights 1/62 vs 1/60 on the 31/30 split) moved 10-33% of the elements of every
    # tensor, head included (max diff 7e-5 there), and gave a relative difference of 1e-2 to 1e-1.
    from utils.models import make_teacher_student
    arch = json.loads((single / "student" / "config.json").read_text())
    init = make_teacher_student({k: arch[k] for k in ("model", "width", "norm", "image_size", "hidden_dims",
                                                      "bottleneck_dim", "out_dim", "bottleneck")},
                                arch["teacher_seed"], arch["student_seed"], arch["alpha"])[1].state_dict()
    w1, w2 = (load_file(str(d / "student" / "model.safetensors")) for d in (single, ddp))
    assert w1.keys() == w2.keys()
    diff_sq = travel_sq = 0.0
    for k in w1:
        a, b = w2[k], w1[k]
        assert not torch.equal(b, init[k]), f"{k} did not train"
        if k.startswith("head."):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        off = ~torch.isclose(a, b, rtol=1e-4, atol=1e-5)
        assert off.float().mean() < 0.01, f"{k}: {off.float().mean():.2%} of elements differ"
        diff_sq += (a - b).double().pow(2).sum().item()
        travel_sq += (b - init[k]).double().pow(2).sum().item()
    assert math.sqrt(diff_sq / travel_sq) < 1e-2


def test_only_rank_0_writes_the_run_folder(runs):
    _, ddp, logs = runs
    entries = {}
    for rank in ("0", "1"):
        log = logs / f"writes-rank{rank}.log"
        assert log.is_file(), f"the write hook was not loaded in rank {rank}"
        lines = [line.split("\t") for line in log.read_text().splitlines()]
        assert lines and lines[0][0] == "started"
        entries[rank] = [(kind, Path(path)) for kind, path in lines if kind != "started"]
    # Accelerate's save_state stores every process's RNG state inside the checkpoint being built; beyond
    # that, rank 1 must write nothing in the run folder.
    outside_checkpoints = [(k, p) for k, p in entries["1"]
                           if not p.relative_to(ddp.resolve()).as_posix().startswith("checkpoints/.tmp-step-")]
    assert outside_checkpoints == [], f"rank 1 wrote into the run folder: {outside_checkpoints}"
    written = {p.relative_to(ddp.resolve()).as_posix() for _, p in entries["0"]}
    replaced = {p.relative_to(ddp.resolve()).as_posix() for kind, p in entries["0"] if kind in ("replace", "rename")}
    for name in ("config.json", "metrics.csv", "summary.json", "probe_table.csv", "probe_accuracy.png"):
        assert name in replaced, f"rank 0 did not (atomically) write {name}"
    assert {"student", "student/config.json"} <= written
    assert (ddp / "student" / "model.safetensors").is_file()  # written by safetensors' Rust code: not hookable
    assert not list(ddp.glob("**/.*.tmp"))


def test_two_processes_stopped_by_sigterm_resume_to_the_uninterrupted_result(runs, tiny_dataset, tmp_path):
    _, reference, _ = runs
    out, hook = tmp_path / "run", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGTERM_HOOK)
    stopped = launch(TORCHRUN, tiny_dataset, out, tmp_path, {"PYTHONPATH": str(hook), "SIGTERM_AFTER": "3"},
                     expect_ok=False)
    assert stopped.returncode != 0 and "SIGTERM received" in stopped.stdout, stopped.stdout[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000010"]  # both agreed at step 10
    assert not (out / "summary.json").exists()
    resumed = launch(TORCHRUN, tiny_dataset, out, tmp_path)
    assert "resuming" in resumed.stdout
    wa, wb = (load_file(str(d / "student" / "model.safetensors")) for d in (reference, out))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed 2-process run differs from the uninterrupted one"
    assert (out / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
