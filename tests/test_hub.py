"""The Hugging Face Hub side without a network: save_pretrained -> from_pretrained in a fresh process, strict
loading, the model card, the upload seam (`utils.hub.hub_api` replaced by a recording fake), failed and retried
pushes, --push-only, and HF_HUB_OFFLINE=1 with a model in the local Hub cache."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import probe
import train_distill
import utils.hub
from conftest import TINY_RUN, FakeHub
from utils.cli import UsageError
from utils.hub import resolve_student
from utils.models import DistillationNetwork, init_network, make_teacher_student

ROOT = Path(__file__).resolve().parents[1]
REPO = "user/repo"
RUN_FILES = ("config.json", "metrics.csv", "metrics.parquet", "summary.json", "probe_table.csv",
             "probe_table.parquet", "probe_accuracy.png")
STUDENT_FILES = {"README.md", "config.json", "model.safetensors"}
# 1 epoch, no checkpoints: the run folder is what matters here, not training.
RUN = TINY_RUN + ["--alpha", "0.5", "--epochs", "1", "--checkpoint-every", "0"]
FLAT = RUN + ["--model", "flatten"]
ARCH = dict(model="vgg11", norm="batch", image_size=32, hidden_dims=[32], bottleneck_dim=8, out_dim=64,
            bottleneck="default")


@pytest.fixture
def sleeps(monkeypatch):
    """Retries back off with time.sleep: record the waits instead of waiting."""
    waits = []

    class Clock:  # only utils.hub's view of `time`: patching time.sleep itself would also stub every other
        sleep = staticmethod(waits.append)  # caller's sleep (e.g. subprocess.run(timeout=...) polls with it)

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(utils.hub, "time", Clock())
    return waits


def use_hub(monkeypatch, fake: FakeHub) -> FakeHub:
    monkeypatch.setattr(utils.hub, "hub_api", lambda: fake)
    return fake


def local_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_layout(run_id: str, student=STUDENT_FILES) -> set:
    return set(student) | {f"runs/{run_id}/student/{f}" for f in student} | {f"runs/{run_id}/{f}" for f in RUN_FILES}


def check_commit(commit: dict, run_dir: Path) -> str:
    """The layout of one run's commit, every byte equal to the local file, parquet equal to its CSV."""
    run_id = json.loads((run_dir / "config.json").read_text())["run_id"]
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == run_id
    assert commit["repo_id"] == REPO and commit["repo_type"] in (None, "model")
    assert set(commit["files"]) == expected_layout(run_id)
    assert run_id in commit["message"]
    files = commit["files"]
    for f in STUDENT_FILES:
        local = (run_dir / "student" / f).read_bytes()
        assert files[f] == local and files[f"runs/{run_id}/student/{f}"] == local, f
    for f in RUN_FILES:
        if f.endswith(".parquet"):
            csv = pd.read_csv(run_dir / f.replace(".parquet", ".csv"))
            pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(files[f"runs/{run_id}/{f}"])), csv)
        else:
            assert files[f"runs/{run_id}/{f}"] == (run_dir / f).read_bytes(), f
    return run_id


@pytest.fixture(scope="module")
def pushed_run(tiny_dataset, tmp_path_factory):
    """A finished 1-epoch VGG11 run, pushed to a working fake Hub from the training command."""
    tmp = tmp_path_factory.mktemp("pushed")
    fake, stdout = FakeHub(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("RANDOM_TEACHERS_CACHE", str(tmp / "cache"))
        use_hub(mp, fake)
        rc = train_distill.main(RUN + ["--dataset", str(tiny_dataset), "--output-dir", str(tmp / "run"),
                                       "--push-to-hub", REPO])
    assert rc == 0, stdout.getvalue()[-2000:]
    return SimpleNamespace(dir=tmp / "run", fake=fake, stdout=stdout.getvalue())


# ----------------------------------------------------------------------- 1. save_pretrained / from_pretrained
@pytest.fixture
def saved_student(tmp_path):
    """A VGG11+BN student with non-default BN buffers (so buffers must round-trip too), saved with save_pretrained."""
    teacher, student = make_teacher_student(ARCH, 3, 4, 0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(7)
    student.eval()
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    return SimpleNamespace(folder=folder, student=student, teacher=teacher)


FRESH_PROCESS = r"""
import sys
import torch
torch.set_num_threads(1)
root, folder, expected, got = sys.argv[1:]
sys.path.insert(0, root)
from utils.models import DistillationNetwork
net = DistillationNetwork.from_pretrained(folder)
assert not net.training, "from_pretrained should return an eval-mode network"
x = torch.load(expected)["x"]
teacher = net.build_teacher()
with torch.no_grad():
    logits, embedding = net(x, return_embedding=True)
    teacher_logits = teacher(x)
torch.save({"logits": logits, "embedding": embedding, "teacher_logits": teacher_logits,
            "state": net.state_dict(), "config": net.config()}, got)
"""


def test_from_pretrained_in_a_fresh_process_is_bit_identical(saved_student, tmp_path):
    student, teacher = saved_student.student, saved_student.teacher
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, embedding = student(x, return_embedding=True)
        teacher_logits = teacher(x)
    torch.save({"x": x}, tmp_path / "expected.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(ROOT), str(saved_student.folder),
                           str(tmp_path / "expected.pt"), str(tmp_path / "got.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt", weights_only=False)
    assert torch.equal(got["logits"], logits) and torch.equal(got["embedding"], embedding)
    assert torch.equal(got["teacher_logits"], teacher_logits)  # the teacher, rebuilt from its seed elsewhere
    state = student.state_dict()
    assert got["state"].keys() == state.keys() and all(torch.equal(got["state"][k], state[k]) for k in state)
    assert got["config"] == student.config()


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("changes", [dict(out_dim=32), dict(hidden_dims=[32, 32]), dict(bottleneck_dim=16),
                                     dict(norm="none"), dict(model="resnet18")],
                         ids=["out_dim", "hidden_dims", "bottleneck_dim", "norm", "model"])
def test_weights_that_do_not_match_the_config_fail_loudly(changes, saved_student):
    edit_config(saved_student.folder, **changes)
    with pytest.raises(RuntimeError):
        DistillationNetwork.from_pretrained(saved_student.folder)  # strict by default, no argument needed
    with pytest.raises(UsageError, match="does not load as a student.*(size mismatch|Missing key|Unexpected key)"):
        resolve_student(str(saved_student.folder))  # one line that names the folder and keeps the real error


def test_missing_or_extra_tensor_fails_loudly(saved_student):
    weights = saved_student.folder / "model.safetensors"
    tensors = load_file(str(weights))
    missing = dict(tensors)
    del missing["head.last.0.weight"]
    save_file(missing, str(weights))
    with pytest.raises(RuntimeError, match="head.last.0.weight"):
        DistillationNetwork.from_pretrained(saved_student.folder)
    save_file(tensors | {"head.extra": torch.zeros(3)}, str(weights))
    with pytest.raises(RuntimeError, match="head.extra"):
        DistillationNetwork.from_pretrained(saved_student.folder)
    save_file(tensors, str(weights))
    assert DistillationNetwork.from_pretrained(saved_student.folder) is not None  # the intact file loads


def test_build_teacher_after_from_pretrained_reproduces_the_teacher(saved_student):
    loaded = DistillationNetwork.from_pretrained(saved_student.folder)
    config = json.loads((saved_student.folder / "config.json").read_text())
    assert config["teacher_seed"] == 3 and config["student_seed"] == 4 and config["alpha"] == 0.5
    rebuilt = loaded.build_teacher()
    for reference in (init_network(ARCH, 3).state_dict(), saved_student.teacher.state_dict()):
        got = rebuilt.state_dict()
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert not rebuilt.training and not any(p.requires_grad for p in rebuilt.parameters())
    # and it is not the student
    assert not torch.equal(rebuilt.state_dict()["head.last.0.weight"], loaded.state_dict()["head.last.0.weight"])


# ---------------------------------------------------------------------------------------- 2. the model card
def markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header starts with `first_cell`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_model_card(pushed_run):
    card = (pushed_run.dir / "student" / "README.md").read_text()
    config = json.loads((pushed_run.dir / "config.json").read_text())
    assert card.startswith("---\n") and "library_name: random-teachers" in card
    assert "arxiv.org/abs/2302.12091" in card
    # the probe table: same subjects, columns and numbers as probe_table.csv (2 decimals)
    table = pd.read_csv(pushed_run.dir / "probe_table.csv")
    rows = markdown_rows(card, "subject")
    assert rows[0] == list(table.columns)
    assert {r[0] for r in rows[1:]} == set(table.subject) == {"input", "teacher", "student"}
    for r in rows[1:]:
        values = table[table.subject == r[0]].iloc[0]
        assert r[1:] == [f"{values[c]:.2f}" for c in table.columns[1:]], r
    # the configuration
    for key, value in (("model", "vgg11"), ("alpha", 0.5), ("teacher_seed", 0), ("student_seed", 1), ("seed", 0),
                       ("epochs", 1), ("out_dim", 64)):
        assert config[key] == value
        assert f"| `{key}` | `{value}` |" in card, key
    # how to load it
    snippet = card[card.index("```python"):]
    assert "DistillationNetwork.from_pretrained(" in snippet and "build_teacher()" in snippet
    assert "probe.py --student" in card


# ------------------------------------------------------------------------------------------ 3. the upload
def test_push_uploads_the_run_in_one_commit(pushed_run):
    fake = pushed_run.fake
    assert fake.repos and all(r["repo_id"] == REPO and r["exist_ok"] and not r["private"] for r in fake.repos)
    assert len(fake.commits) == 1 and len(fake.attempts) == 1
    run_id = check_commit(fake.commits[0], pushed_run.dir)
    assert run_id.startswith("run-")  # from the run folder's name
    assert f"pushed {pushed_run.dir}" in pushed_run.stdout
    assert not any("checkpoints" in p for p in fake.commits[0]["files"])


def test_hub_private_is_passed_on(pushed_run, monkeypatch):
    fake = use_hub(monkeypatch, FakeHub())
    assert train_distill.main(["--push-only", str(pushed_run.dir), "--push-to-hub", REPO, "--hub-private"]) == 0
    assert fake.repos[0]["private"] is True and len(fake.commits) == 1


def test_two_runs_push_to_disjoint_paths(pushed_run, tiny_dataset, tmp_path, monkeypatch):
    fake = use_hub(monkeypatch, FakeHub())
    other = tmp_path / "run"  # the same folder name as the first run: the run ids must still differ
    assert train_distill.main(FLAT + ["--dataset", str(tiny_dataset), "--output-dir", str(other),
                                      "--push-to-hub", REPO]) == 0
    second_id = check_commit(fake.commits[0], other)
    first_id = json.loads((pushed_run.dir / "config.json").read_text())["run_id"]
    assert first_id != second_id
    first = {p for p in pushed_run.fake.commits[0]["files"] if p.startswith("runs/")}
    second = {p for p in fake.commits[0]["files"] if p.startswith("runs/")}
    assert first and second and not first & second
    # only the root student (the newest one) is shared, and it is this run's
    shared = set(pushed_run.fake.commits[0]["files"]) & set(fake.commits[0]["files"])
    assert shared == STUDENT_FILES
    assert fake.commits[0]["files"]["model.safetensors"] == (other / "student" / "model.safetensors").read_bytes()


def test_failed_push_keeps_the_run_and_push_only_retries(tiny_dataset, tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "run"
    failing = use_hub(monkeypatch, FakeHub(fail_first=10 ** 6))
    rc = train_distill.main(FLAT + ["--dataset", str(tiny_dataset), "--output-dir", str(out), "--push-to-hub", REPO])
    assert rc == 1
    said = capsys.readouterr().out
    assert f"--push-only {out}" in said and f"--push-to-hub {REPO}" in said
    assert not failing.commits and len(failing.attempts) >= 2  # retried ...
    assert len(sleeps) == len(failing.attempts) - 1 and all(b > a for a, b in zip(sleeps, sleeps[1:]))  # back-off
    # the run folder is complete and exactly what the push tried to send
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    attempted = failing.attempts[-1]["files"]
    assert set(attempted) == expected_layout(run_id)
    for path, content in attempted.items():
        if not path.endswith(".parquet"):
            local = out / "student" / path if "/" not in path else out / path.split(f"runs/{run_id}/", 1)[1]
            assert local.read_bytes() == content, path
    before = local_files(out)

    working = use_hub(monkeypatch, FakeHub())
    assert train_distill.main(["--push-only", str(out), "--push-to-hub", REPO]) == 0
    assert len(working.commits) == 1
    check_commit(working.commits[0], out)
    assert local_files(out) == before, "--push-only changed the run folder"
    # without --push-to-hub it reuses the repo the run was trained with
    again = use_hub(monkeypatch, FakeHub())
    assert train_distill.main(["--push-only", str(out)]) == 0
    assert len(again.commits) == 1 and again.commits[0]["repo_id"] == REPO
    assert local_files(out) == before


def test_push_only_errors(tiny_dataset, tmp_path, monkeypatch, capsys):
    fake = use_hub(monkeypatch, FakeHub())
    out = tmp_path / "run"
    (out).mkdir()
    with pytest.raises(SystemExit) as exc:  # not a finished run
        train_distill.main(["--push-only", str(out), "--push-to-hub", REPO])
    assert exc.value.code == 2 and "--push-only" in capsys.readouterr().err
    assert train_distill.main(FLAT + ["--dataset", str(tiny_dataset), "--output-dir", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # trained without --push-to-hub and none given now
        train_distill.main(["--push-only", str(out)])
    assert exc.value.code == 2 and "--push-to-hub" in capsys.readouterr().err
    assert not fake.commits


def test_push_retries_then_succeeds(pushed_run, monkeypatch, sleeps):
    fake = use_hub(monkeypatch, FakeHub(fail_first=2))
    before = local_files(pushed_run.dir)
    assert train_distill.main(["--push-only", str(pushed_run.dir), "--push-to-hub", REPO]) == 0
    assert len(fake.attempts) == 3 and len(fake.commits) == 1 and len(sleeps) == 2
    check_commit(fake.commits[0], pushed_run.dir)
    assert local_files(pushed_run.dir) == before


def test_offline_push_fails_fast_with_the_real_client(pushed_run, monkeypatch, capsys, sleeps):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = local_files(pushed_run.dir)
    started = time.monotonic()
    assert train_distill.main(["--push-only", str(pushed_run.dir), "--push-to-hub", REPO]) == 1
    assert time.monotonic() - started < 20
    assert sleeps == [], "offline mode was retried"
    said = capsys.readouterr().out
    assert "HF_HUB_OFFLINE" in said and f"--push-only {pushed_run.dir}" in said
    assert local_files(pushed_run.dir) == before


# ------------------------------------------------------------------------------------------ 4. probe.py push
def test_probe_push_goes_through_the_seam(pushed_run, tiny_dataset, tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "probe"
    args = ["--student", str(pushed_run.dir), "--dataset", str(tiny_dataset), "--output-dir", str(out),
            "--probe-epochs", "2", "--no-teacher"]
    fake = use_hub(monkeypatch, FakeHub())
    assert probe.main(args + ["--push-to-hub", REPO]) == 0
    assert len(fake.commits) == 1
    files = fake.commits[0]["files"]
    results = json.loads((out / "probe_results.json").read_text())
    probe_id = results["run_id"]  # recorded, so a retry (--push-only) uploads to the same place
    assert set(files) == {f"probes/{probe_id}/{f}" for f in ("probe_table.csv", "probe_table.parquet",
                                                              "probe_results.json")}
    assert probe_id in fake.commits[0]["message"]
    assert files[f"probes/{probe_id}/probe_table.csv"] == (out / "probe_table.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(files[f"probes/{probe_id}/probe_table.parquet"])),
                                  pd.read_csv(out / "probe_table.csv"))
    assert not any(p.startswith("runs/") or "/" not in p for p in files)  # never the student or a run's files

    # a failed push keeps the results and --push-only retries them, to the same paths
    shutil.rmtree(out)
    failing = use_hub(monkeypatch, FakeHub(fail_first=10 ** 6))
    assert probe.main(args + ["--push-to-hub", REPO]) == 1
    assert f"--push-only {out}" in capsys.readouterr().out and not failing.commits
    before = local_files(out)
    working = use_hub(monkeypatch, FakeHub())
    assert probe.main(["--push-only", str(out), "--push-to-hub", REPO]) == 0
    new_id = json.loads((out / "probe_results.json").read_text())["run_id"]
    assert set(working.commits[0]["files"]) == {p.replace(probe_id, new_id) for p in files}
    assert set(working.commits[0]["files"]) == set(failing.attempts[-1]["files"])
    assert local_files(out) == before


# --------------------------------------------------------------------- 5. HF_HUB_OFFLINE=1 with a cached id
def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """The huggingface_hub cache layout: blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main = commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return commit


OFFLINE_RESOLVE = r"""
import sys
root, expected, commit = sys.argv[1:]
sys.path.insert(0, root)
import torch
from safetensors.torch import load_file
from utils.cli import UsageError
from utils.hub import resolve_student
reference = load_file(expected)
for revision in (None, commit):
    net, run_config = resolve_student("user/repo", revision=revision)
    state = net.state_dict()
    assert run_config is None and not net.training
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), revision
try:
    resolve_student("user/not-cached")
except UsageError as err:
    assert "HF_HUB_OFFLINE" in str(err) and err.flag == "--student", err
else:
    raise AssertionError("an uncached id loaded")
print("RESOLVED")
"""


def test_offline_hub_id_from_the_local_cache(saved_student, tiny_dataset, tmp_path):
    cache = tmp_path / "hf" / "hub"
    commit = fake_hub_cache(cache, "user/repo", saved_student.folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(cache),
               OMP_NUM_THREADS="1", RANDOM_TEACHERS_CACHE=str(tmp_path / "data-cache"))
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_RESOLVE, str(ROOT),
                           str(saved_student.folder / "model.safetensors"), commit],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "RESOLVED" in proc.stdout, proc.stderr[-3000:]

    out = tmp_path / "probe"
    proc = subprocess.run([sys.executable, str(ROOT / "probe.py"), "--student", "user/repo", "--dataset",
                           str(tiny_dataset), "--output-dir", str(out), "--probe-epochs", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "probe_table.csv")
    assert set(table.subject) == {"student", "teacher"}  # the teacher rebuilt from the cached config's seed
    assert json.loads((out / "probe_results.json").read_text())["student"] == "user/repo"
