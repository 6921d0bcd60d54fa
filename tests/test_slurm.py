"""The batch scripts in accelerate_configs/slurm/ under a real Slurm: a local controller and two emulated nodes (n1,
n2) on this machine, started by `sudo tools/slurm/up.sh` (stopped by tools/slurm/down.sh; .ci/run does both).

Every job the tests submit is a real sbatch of the project's scripts, with the tiniest settings. A small
sitecustomize (HOOK) steers the runs from the outside: it holds a run after a given step until a signal arrives
(so a signal always lands mid-training), records which node each process ran on, and points reproduce.py at a
test grid. Slurm keeps a requeued job pending for about two minutes (BeginTime); the tests release it after 5 s."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT
from supervised_helpers import TINY_RECIPE, save_tiny_student
from test_ddp import ARGS, assert_two_process_run_matches_one

UP = "sudo tools/slurm/up.sh"


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not installed"
    done = subprocess.run(["sinfo", "-h", "-N", "-n", "n1,n2", "-o", "%N %t"], capture_output=True, text=True)
    states = dict(line.split() for line in done.stdout.splitlines()) if done.returncode == 0 else {}
    if sorted(states) != ["n1", "n2"]:
        return "no local Slurm cluster answers"
    return None


_problem = _cluster_problem()
if _problem:
    pytest.skip(f"{_problem}: start the local cluster with `{UP}` (tools/slurm/down.sh stops it) to run the "
                "Slurm tests", allow_module_level=True)
pytestmark = pytest.mark.slurm

HOOK = textwrap.dedent('''
    import builtins, os, signal, socket, sys, time
    _import, _state = builtins.__import__, {"steps": 0, "patched": set(), "signalled": False}
    _first_start = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"

    def _hooked_import(*args, **kwargs):
        module = _import(*args, **kwargs)
        grids = sys.modules.get("utils.grids")
        if "grids" not in _state["patched"] and getattr(grids, "GRID_DIR", None) and os.environ.get("RT_GRID_DIR"):
            _state["patched"].add("grids")
            from pathlib import Path
            grids.GRID_DIR = Path(os.environ["RT_GRID_DIR"])
        checkpoint = sys.modules.get("utils.checkpoint")
        if "signal" not in _state["patched"] and getattr(checkpoint, "PreemptionSignal", None):
            _state["patched"].add("signal")
            handle = checkpoint.PreemptionSignal._handle
            def _handle(self, signum, frame):
                _state["signalled"] = True
                return handle(self, signum, frame)
            checkpoint.PreemptionSignal._handle = _handle
        step = getattr(sys.modules.get("utils.distill"), "DistillStep", None)
        if "step" not in _state["patched"] and step is not None:
            _state["patched"].add("step")
            if os.environ.get("RT_RECORD_DIR"):  # which node and rank this training process is
                name = "rank%s-node%s" % (os.environ.get("RANK", "0"), os.environ.get("SLURM_NODEID", "-"))
                open(os.path.join(os.environ["RT_RECORD_DIR"], name), "w").write(socket.gethostname())
            original = step.__call__
            def call(self, *a, **k):
                result = original(self, *a, **k)
                _state["steps"] += 1
                hold = int(os.environ.get("RT_HOLD_AFTER_STEP", "0"))
                if _state["steps"] == hold and (_first_start or os.environ.get("RT_HOLD_EVERY_START")):
                    print("HOLDING after step %d" % hold, flush=True)
                    deadline = time.time() + 600
                    while not _state["signalled"] and time.time() < deadline:
                        time.sleep(0.2)
                return result
            step.__call__ = call
        return module

    builtins.__import__ = _hooked_import
''')
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SUSPENDED", "SIGNALING", "STAGE_OUT"}
SUBMITTED: list[str] = []  # every job id the tests submitted: released from BeginTime, cancelled at the end
DRIVERS: list = []  # callables the module's background thread runs every second (e.g. signal a job when it holds)


def sbatch(script: str, *args, env: dict, options=()) -> str:
    done = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", *options,
                           f"accelerate_configs/slurm/{script}", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job = done.stdout.strip().split(";")[0]
    SUBMITTED.append(job)
    return job


def jobs(job: str) -> list[dict]:
    """`scontrol show job` as one dict per job (an array gives one per task)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def release_requeued():
    """Slurm holds a requeued job for ~2 minutes (BeginTime): start the tests' jobs again after 5 s instead. Not at
    once: the requeue revokes the job's credential, and Slurm refuses (FAILED, "Job credential revoked") a start
    whose new credential is dated in the same second as the revocation (whole seconds); SubmitTime is the requeue's."""
    for job in list(SUBMITTED):
        for info in jobs(job):
            if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
                continue
            if time.time() - time.mktime(time.strptime(info["SubmitTime"], "%Y-%m-%dT%H:%M:%S")) >= 5:
                subprocess.run(["scontrol", "update", f"JobId={info['JobId']}", "StartTime=now"],
                               capture_output=True)


def drive_every_second(stop: threading.Event):
    while not stop.wait(1):
        release_requeued()
        for drive in list(DRIVERS):
            drive()


def signal_on_hold(job: str, log: Path, command: list[str]):
    """A driver: run `command job` each time the job's run reports that it holds (once per start)."""
    sent = [0]

    def drive():
        if text(log).count("HOLDING") > sent[0]:
            sent[0] += 1
            subprocess.run([*command, job], capture_output=True)  # never raise: the thread must keep driving
    return drive


def wait(until, what: str, timeout: float = 420):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = until()
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_ended(job: str, timeout: float = 420) -> list[dict]:
    def ended():
        infos = jobs(job)
        assert infos, f"Slurm no longer knows job {job}"
        return infos if all(i["JobState"] not in ACTIVE for i in infos) else None

    return wait(ended, f"job {job} to end", timeout)


def text(path: Path) -> str:
    """A job's log. Slurm sends stdout (probe lines) and stderr (tqdm's bar) into one file, so a line can land
    inside a bar's multi-byte block character: decode what is broken as U+FFFD instead of failing on it."""
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def slurm(tiny_dataset, tmp_path_factory):
    """(environment for sbatch, scratch folder, dataset); every job the module submitted is cancelled at the end."""
    tmp = tmp_path_factory.mktemp("slurm")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "hook"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "RANDOM_TEACHERS_CACHE": str(tmp / "cache")}
    stop = threading.Event()
    driver = threading.Thread(target=drive_every_second, args=(stop,), daemon=True)
    driver.start()
    yield env, tmp, tiny_dataset
    stop.set()
    driver.join()
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline and any(i["JobState"] in ACTIVE for j in SUBMITTED for i in jobs(j)):
            time.sleep(1)


@pytest.fixture(scope="module")
def distill_jobs(slurm):
    """The module's distill.sbatch jobs, submitted together (they mostly wait for signals), and the uninterrupted
    one-process run they are compared with, made meanwhile on this machine."""
    env, tmp, dataset = slurm
    args = [*ARGS, "--dataset", dataset]  # exactly the run of tests/test_ddp.py (its tolerances are argued for it)
    held = {**env, "RT_HOLD_AFTER_STEP": "3"}
    usr1, requeue = ["scancel", "--signal=USR1", "--batch"], ["scontrol", "requeue"]
    submitted = {}
    for name, extra_env, options, on_hold in (
            ("usr1", held, (), usr1),
            ("requeue", held, (), requeue),                                 # as a pre-emption does
            # USR1 60 s before the 3-minute limit (Slurm sends it up to ~30 s early): 90-120 s into each start
            ("time_limit", held, ("--time=3", "--signal=B:USR1@60"), None),
            ("keeps_failing", {**held, "RT_HOLD_EVERY_START": "1", "MAX_REQUEUES": "1"}, (), usr1),
            ("two_nodes", {**env, "RT_RECORD_DIR": str(tmp / "nodes")}, ("--nodes=2",), None)):
        (tmp / "nodes").mkdir(exist_ok=True)
        run_dir, log = tmp / f"run-{name}", tmp / f"slurm-{name}.out"
        job = sbatch("distill.sbatch", *args, env={**extra_env, "RUN_DIR": str(run_dir)},
                     options=(f"--output={log}", *options))
        submitted[name] = (job, run_dir, log)
        if on_hold:  # the signal is sent as soon as the run holds after step 3: the jobs proceed side by side
            DRIVERS.append(signal_on_hold(job, log, on_hold))
    reference = tmp / "reference"
    subprocess.run([sys.executable, "train_distill.py", *args, "--output-dir", str(reference)], cwd=ROOT,
                   env={**env, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}, check=True, capture_output=True,
                   timeout=600)
    return submitted, reference


def assert_same_run(run_dir: Path, reference: Path):
    a, b = (load_file(str(d / "student" / "model.safetensors")) for d in (reference, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    assert (run_dir / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert not (run_dir / "checkpoints").exists()  # finished: the checkpoints are gone


def check_requeued_and_resumed(distill_jobs, name, requeues=1):
    (job, run_dir, log), reference = distill_jobs[0][name], distill_jobs[1]
    [info] = wait_ended(job)
    out = text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-3000:]
    restarts = int(info["Restarts"])
    assert restarts == requeues or (requeues is None and restarts >= 1), f"requeued {restarts} times:\n{out[-3000:]}"
    starts = re.findall(r"job (\d+) \(start (\d+)\):.*run folder (\S+)", out)
    assert starts == [(job, str(i + 1), str(run_dir)) for i in range(restarts + 1)], out[-3000:]  # same job, folder
    if requeues is not None:
        assert out.count("checkpoint saved") == out.count(f"resuming {run_dir}") == restarts, out[-3000:]
    else:  # timed by Slurm: the margin may also stop a restart, reach a run before its start-up installed its
        # signal handler (no checkpoint yet: it starts over) or one that has just finished (the restart finds it so)
        assert "checkpoint saved" in out and f"resuming {run_dir}" in out, out[-3000:]
        assert out.count("requeueing it") == restarts, out[-3000:]
    assert_same_run(run_dir, reference)
    time.sleep(3)  # a finished job is not requeued again
    [info] = jobs(job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == restarts
    return out


def test_usr1_to_the_batch_script_checkpoints_requeues_and_resumes_bit_identically(distill_jobs):
    out = check_requeued_and_resumed(distill_jobs, "usr1")  # scancel --signal=USR1 --batch once it held
    assert "requeueing it (requeue 1 of at most 10)" in out


def test_preemption_by_scontrol_requeue_resumes_bit_identically(distill_jobs):
    out = check_requeued_and_resumed(distill_jobs, "requeue")  # scontrol requeue once it held
    assert "requeueing it" not in out  # Slurm's own requeue, not a second one from the script


def test_time_limit_signal_margin_checkpoints_before_the_limit_and_resumes(distill_jobs):
    # the restart may itself reach the margin before it finishes: then it is requeued once more, and resumes again
    out = check_requeued_and_resumed(distill_jobs, "time_limit", requeues=None)
    assert "TIME LIMIT" not in out and "requeueing it (requeue 1" in out  # stopped by the margin, not killed


def test_a_run_that_keeps_being_stopped_is_requeued_a_bounded_number_of_times(distill_jobs):
    job, run_dir, log = distill_jobs[0]["keeps_failing"]  # USR1 each time it holds, MAX_REQUEUES=1
    [info] = wait_ended(job)
    out = text(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1" and out.count("HOLDING") == 2, out[-3000:]
    assert "already requeued 1 times (MAX_REQUEUES=1): not requeued" in out
    assert list((run_dir / "checkpoints").iterdir()) and not (run_dir / "summary.json").exists()  # kept to resume


def test_two_nodes_rendezvous_into_one_two_process_run_equal_to_one_process(distill_jobs):
    (job, run_dir, log), reference = distill_jobs[0]["two_nodes"], distill_jobs[1]
    [info] = wait_ended(job)
    out = text(log)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", out[-3000:]
    # one accelerate launch per node, each starting one training process; together one 2-process run
    assert sorted(p.name for p in (run_dir.parent / "nodes").iterdir()) == ["rank0-node0", "rank1-node1"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert_two_process_run_matches_one(run_dir, reference)


# ------------------------------------------------------------------------------------------ reproduce.py --slurm
MINI = {"fixed": {"model": "vgg11", "width": 0.25, "hidden_dims": [16], "bottleneck_dim": 8, "out_dim": 32,
                  "batch_size": 64, "epochs": 1, "train_subset": 100, "probe_epochs": 1, "log_every": 0,
                  "probe_every": 0},
        "grid": {"alpha": [1.0], "repeat": [0, 1]},
        "report": {"kind": "sweep", "x": "alpha", "probe": "knn", "title": "mini"}}


def test_reproduce_slurm_array_runs_every_point_and_reports_like_a_local_run(slurm, monkeypatch, capfd):
    import reproduce
    import utils.grids

    env, tmp, dataset = slurm
    grids = tmp / "grids"
    grids.mkdir()
    (grids / "mini.yaml").write_text(yaml.safe_dump(MINI | {"fixed": MINI["fixed"] | {"dataset": str(dataset)}}))
    monkeypatch.setattr(utils.grids, "GRID_DIR", grids)
    for key, value in {**env, "RT_GRID_DIR": str(grids), "SBATCH_OUTPUT": str(tmp / "slurm-reproduce-%A_%a.out")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    on_slurm, local = tmp / "runs-slurm", tmp / "runs-local"
    capfd.readouterr()
    assert reproduce.main(["run", "mini", "--runs", str(on_slurm), "--slurm"]) == 0
    job = re.search(r"Submitted batch job (\d+)", capfd.readouterr().out).group(1)
    SUBMITTED.append(job)
    assert reproduce.main(["run", "mini", "--runs", str(local)]) == 0  # meanwhile, the same grid on this machine
    tasks = wait_ended(job)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), [text(tmp / f"slurm-reproduce-{job}_{i}.out") for i in "01"]
    for i, repeat in enumerate((0, 1)):  # array task i ran point i
        assert f"point {i} of mini" in text(tmp / f"slurm-reproduce-{job}_{i}.out")
        config = json.loads((on_slurm / "mini" / f"alpha-1_repeat-{repeat}" / "config.json").read_text())
        assert config["repeat"] == repeat and config["teacher_seed"] == 2 * repeat  # a new teacher per repetition
    capfd.readouterr()
    assert reproduce.main(["status", "mini", "--runs", str(on_slurm)]) == 0
    assert "2/2 finished" in capfd.readouterr().out
    for runs in (on_slurm, local):
        assert reproduce.main(["report", "mini", "--runs", str(runs)]) == 0
    assert (on_slurm / "mini" / "report.csv").read_text() == (local / "mini" / "report.csv").read_text()
    assert (on_slurm / "mini" / "report.md").read_text() == (local / "mini" / "report.md").read_text()


# ------------------------------------------------------------------------------------------ imp_array.sbatch
def test_imp_pruning_array_waits_for_the_dense_job_and_never_starts_after_a_failed_one(slurm):
    env, tmp, dataset = slurm
    student = save_tiny_student(tmp / "student")
    recipe = ["--dataset", dataset, *TINY_RECIPE, "--rounds", "1"]
    submitted = {}
    for name, student_path in (("good", student), ("broken", tmp / "no-such-student")):
        out = tmp / f"imp-{name}"
        job_env = {**env, "STUDENT": str(student_path), "OUT": str(out)}
        dense = sbatch("imp_array.sbatch", "dense", *recipe, "--rewind-epochs", "0", env=job_env,
                       options=("--array=0", f"--output={tmp}/imp-{name}-dense-%a.out"))
        prune = sbatch("imp_array.sbatch", "prune", *recipe, env=job_env,  # arms 0, 1: student l=0, init l=0
                       options=("--array=0-1", f"--dependency=afterok:{dense}", f"--output={tmp}/imp-{name}-prune-%a.out"))
        submitted[name] = dense, prune, out

    dense, prune, out = submitted["broken"]
    [info] = wait_ended(dense)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    tasks = wait_ended(prune, timeout=120)
    assert all(t["JobState"] == "CANCELLED" and t["Reason"] == "DependencyNeverSatisfied" for t in tasks), tasks
    assert not list(tmp.glob("imp-broken-prune-*.out")) and not out.exists()  # no pruning task ever started

    dense, prune, out = submitted["good"]
    [info] = wait_ended(dense)
    tasks = wait_ended(prune)
    assert info["JobState"] == "COMPLETED" and all(t["JobState"] == "COMPLETED" for t in tasks), \
        [text(p) for p in sorted(tmp.glob("imp-good-*.out"))]
    ended = info["EndTime"]
    assert all(t["StartTime"] >= ended for t in tasks)  # ISO timestamps: the pruning started after the dense run
    (sub,) = [p for p in out.iterdir() if p.is_dir() and (p / "fingerprint.json").exists()]  # the student's folder
    rounds = {p.parent.relative_to(sub).as_posix() for p in sub.rglob("final.pt")}
    assert {"seed-0/student-l0/round-1", "seed-0/init-l0/round-1"} <= rounds, rounds
