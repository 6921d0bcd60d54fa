"""Never lose or fake a result: bad input is one line and exit 2 with nothing on disk changed; a diverged run
stops with exit 3 and writes no student; probe.py reuses the probed run's settings and writes somewhere unique
and writable; the dataset cache cannot run code."""
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import probe
import train_distill
import utils.cli
from conftest import ROOT, TINY_RUN, write_parquet_dataset
from utils.checkpoint import list_checkpoints
from utils.data import default_cache_dir, load_dataset
from utils.distill import DistillStep

RUN = TINY_RUN + ["--epochs", "1", "--alpha", "0.5"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes' hash and mtime: any change shows."""
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_finished_run(folder: Path) -> Path:
    """What a finished run folder holds (contents do not matter: a failed command must not touch them)."""
    for name in ("summary.json", "config.json", "metrics.csv", "probe_table.csv", "student/model.safetensors",
                 "probes/digits/probe_table.csv"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"old {name}\n")
    return folder


def assert_one_line_error(main, args, flag, capsys, code=2, progress_bar=False) -> str:
    """Exit `code` and exactly one stderr line, naming `flag` (besides the progress bar of a run that started)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    if progress_bar:
        lines = [line for line in lines if not line.startswith("distill:")]
    assert exc.value.code == code, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict:
    """An empty folder, and an imagefolder dataset with one truncated PNG."""
    from PIL import Image

    from utils.data import build_digits

    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    train, test = build_digits(40, 20)
    for split, images in (("train", train), ("test", test)):
        for i, (img, label) in enumerate(zip(images.images, images.labels)):
            path = root / "pngs" / split / str(int(label)) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    broken = sorted((root / "pngs" / "train").rglob("*.png"))[3]
    broken.write_bytes(broken.read_bytes()[:60])
    return {"empty": root / "empty", "pngs": root / "pngs", "broken": broken}


# --------------------------------------------------------------------- 1. bad input: train_distill.py
DISTILL_CASES = {  # flag-level: rejected while parsing, before torch work
    "lr": (["--lr", "-1"], "--lr"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    "image-size-negative": (["--image-size", "-3"], "--image-size"),
    "image-size-zero": (["--image-size", "0"], "--image-size"),
    "image-size-vgg": (["--image-size", "16"], "--image-size"),
    "image-size-built-in": (["--dataset", "digits", "--image-size", "48"], "--image-size"),
    "hidden-dims": (["--hidden-dims", "0"], "--hidden-dims"),
    "train-subset": (["--train-subset", "-5"], "--train-subset"),
    "probe-every": (["--probe-every", "-3"], "--probe-every"),
    "teacher-temp": (["--teacher-temp", "0"], "--teacher-temp"),
    "epochs": (["--epochs", "0"], "--epochs"),
    "width": (["--width", "20"], "--width"),
    "weight-decay": (["--weight-decay", "-0.1"], "--weight-decay"),
    "knn-k": (["--knn-k", "0"], "--knn-k"),
    "bottleneck": (["--bottleneck", "a/b"], "--bottleneck"),
    "output-is-file": (["--output-dir", "{file}"], "--output-dir"),
    "output-under-file": (["--output-dir", "{file}/run"], "--output-dir"),
    # data-level: found once the dataset is opened, still before anything is written
    "empty-folder": (["--dataset", "{empty}"], "--dataset"),
    "truncated-png": (["--dataset", "{pngs}"], "--dataset"),
    "train-subset-too-big": (["--train-subset", "100000"], "--train-subset"),
    "val-size-too-big": (["--val-size", "100000"], "--val-size"),
    "knn-k-above-train-set": (["--knn-k", "257"], "--knn-k"),  # 256 probe-train images
    "knn-k-above-train-set-after-val": (["--val-size", "64", "--knn-k", "193"], "--knn-k"),
}


@pytest.mark.parametrize("case", list(DISTILL_CASES))
def test_train_distill_bad_input(case, tiny_dataset, bad_data, tmp_path, capsys):
    args, flag = DISTILL_CASES[case]
    (tmp_path / "file").write_text("not a folder\n")
    args = [a.format(file=tmp_path / "file", **bad_data) for a in args]
    out = fake_finished_run(tmp_path / "run")
    before = snapshot(out) | {"file": (tmp_path / "file").read_text()}
    line = assert_one_line_error(train_distill.main, RUN + ["--dataset", str(tiny_dataset), "--output-dir",
                                                            str(out), "--overwrite", *args], flag, capsys)
    assert snapshot(out) | {"file": (tmp_path / "file").read_text()} == before  # --overwrite discarded nothing
    if case == "truncated-png":
        assert str(bad_data["broken"]) in line  # names the file
    if case.startswith("knn-k-above"):  # names the size the k-NN probe votes among
        assert ("on 192 images" if "val" in case else "on 256 images") in line


def test_bad_flags_are_reported_before_torch_is_imported(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['{script}', {flag!r}, {value!r}]\ntry:\n"
            "    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    for script, flag, value in (("train_distill.py", "--lr", "-1"), ("probe.py", "--knn-k", "0"),
                                ("train_distill.py", "--help", ""), ("imp.py", "--prune-fraction", "1.5"),
                                ("lmc.py", "--copies", "1"), ("reproduce.py", "--point", "-1"),
                                ("landscape.py", "--resolution", "0")):
        done = subprocess.run([sys.executable, "-c", code.format(script=script, flag=flag, value=value)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.split()[-2:] == ["0" if flag == "--help" else "2", "False"], done.stdout + done.stderr


def test_help_shows_defaults_and_one_group_per_concern():
    for script in ("train_distill.py", "probe.py"):
        text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout
        groups = [line[:-1] for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
        assert len(groups) == len(set(groups)), groups
        assert not re.search(r"S[P]EC", text)  # spelled so that `grep -rn` over the project finds no mention
        if script == "train_distill.py":
            for shown in ("(default: cifar10)", "(default: 150)", "(default: 256)", "(default: 65536)",
                          "(default: 2048 2048)", "(default: 0.001)"):
                assert shown in " ".join(text.split()), shown
        else:
            assert "the run's value, else 10" in " ".join(text.split())


def test_a_read_only_output_dir_is_refused_before_any_data_is_read(tiny_dataset, tmp_path, capsys, monkeypatch):
    """Tests run as root, for whom permission bits do not stop a write: the write probe itself is replaced."""
    out = fake_finished_run(tmp_path / "run")
    before = snapshot(out)
    monkeypatch.setattr(utils.cli, "writable", lambda folder: False)
    monkeypatch.setattr(train_distill, "load_dataset", lambda *a, **k: pytest.fail("data was read"))
    line = assert_one_line_error(train_distill.main, RUN + ["--dataset", str(tiny_dataset), "--output-dir",
                                                            str(out / "sub"), "--overwrite"], "--output-dir", capsys)
    assert "not writable" in line and snapshot(out) == before


# ------------------------------------------------------------------------------ 2. bad input: probe.py
@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANDOM_TEACHERS_CACHE", str(out.parent / "cache"))
        assert train_distill.main(RUN + ["--dataset", str(tiny_dataset), "--output-dir", str(out)]) == 0
    return out


PROBE_CASES = {
    "no-student": ([], "--student"),
    "missing-student": (["--student", "{tmp}/nope"], "--student"),
    "truncated-weights": (["--student", "{truncated}"], "--student"),
    "unfinished-run": (["--student", "{unfinished}"], "--student"),
    "knn-k": (["--student", "{run}", "--knn-k", "0"], "--knn-k"),
    "knn-k-above-train-set": (["--student", "{run}", "--knn-k", "1000"], "--knn-k"),
    "knn-k-above-train-set-after-val": (["--student", "{run}", "--val-size", "200", "--knn-k", "57"], "--knn-k"),
    "probe-epochs": (["--student", "{run}", "--probe-epochs", "0"], "--probe-epochs"),
    "val-size": (["--student", "{run}", "--val-size", "-1"], "--val-size"),
    "image-size-vgg": (["--student", "{run}", "--image-size", "8"], "--image-size"),
    "image-size-built-in": (["--student", "{run}", "--dataset", "digits", "--image-size", "40"], "--image-size"),
    "output-is-file": (["--student", "{run}", "--output-dir", "{tmp}/file"], "--output-dir"),
    "empty-dataset": (["--student", "{run}", "--dataset", "{empty}"], "--dataset"),
}


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_probe_bad_input(case, finished_run, bad_data, tmp_path, capsys, monkeypatch):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(finished_run / "student", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copy(finished_run / "config.json", unfinished)
    (tmp_path / "file").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)  # the default output folder runs/ would land here
    monkeypatch.setenv("RANDOM_TEACHERS_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # decoded data
    args, flag = PROBE_CASES[case]
    args = [a.format(tmp=tmp_path, run=finished_run, truncated=truncated, unfinished=unfinished, **bad_data)
            for a in args]
    before, run_before = snapshot(tmp_path), snapshot(finished_run)
    line = assert_one_line_error(probe.main, args, flag, capsys)
    assert snapshot(tmp_path) == before and snapshot(finished_run) == run_before  # no cache here: it is elsewhere
    if case == "truncated-weights":
        assert str(truncated) in line


def test_a_finished_run_is_not_reported_done_for_other_arguments(finished_run, tiny_dataset, capsys):
    before = snapshot(finished_run)
    same = RUN + ["--dataset", str(tiny_dataset), "--output-dir", str(finished_run)]
    assert train_distill.main(same) == 0 and "already holds a finished run" in capsys.readouterr().out
    line = assert_one_line_error(train_distill.main, same + ["--lr", "0.002"], "--lr", capsys)
    assert "--overwrite" in line and snapshot(finished_run) == before


# ----------------------------------------------------------------------------------- 3. divergence stops
def test_a_diverged_run_stops_with_exit_3_and_writes_no_student(tiny_dataset, tmp_path, capsys, monkeypatch):
    """A NaN appears in the student's weights after step 6 (epoch 2 of 3, after the epoch-1 checkpoint)."""
    out = tmp_path / "run"
    original, calls = DistillStep.__call__, []

    def poisoned(step_self, idx, global_batch, **kwargs):
        result = original(step_self, idx, global_batch, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                next(step_self.student.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(DistillStep, "__call__", poisoned)
    args = TINY_RUN + ["--epochs", "3", "--alpha", "0.5", "--checkpoint-every", "1", "--dataset", str(tiny_dataset),
                       "--output-dir", str(out)]
    line = assert_one_line_error(train_distill.main, args, "diverged", capsys, code=3, progress_bar=True)
    assert "epoch 2" in line and str(list_checkpoints(out / "checkpoints")[0]) in line
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000000004"]  # the last good one
    for written in ("student", "summary.json", "probe_table.csv"):
        assert not (out / written).exists(), written
    metrics = pd.read_csv(out / "metrics.csv", keep_default_na=False)
    assert (metrics["value"].astype(str) != "").all()  # non-finite values are written as nan, never blank
    assert "nan" in set(metrics["value"].astype(str).str.lower())


# -------------------------------------------------------------------------- 4. probe.py reuses the run
def test_probe_reuses_the_runs_columns_image_size_and_probe_settings(tmp_path, capsys, monkeypatch):
    data = write_parquet_dataset(tmp_path / "custom", 128, 64, image_column="pixels", label_column="digit")
    out = tmp_path / "run"
    assert train_distill.main(RUN + ["--dataset", str(data), "--image-column", "pixels", "--label-column", "digit",
                                     "--image-size", "40", "--probe-standardized", "--knn-k", "5",
                                     "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert probe.main(["--student", str(out), "--no-teacher"]) == 0
    printed = capsys.readouterr().out
    assert "--image-size=40" in printed and "--probe-standardized=True" in printed
    saved = json.loads((out / "probes" / "custom" / "probe_results.json").read_text())
    assert saved["args"]["image_column"] == "pixels" and saved["args"]["image_size"] == 40
    # the same student, data and probe settings: probe.py reproduces the run's own final probes
    run_rows = pd.read_csv(out / "metrics.csv")
    final = run_rows[run_rows["epoch"] == run_rows["epoch"].max()].set_index("metric")["value"]
    for probe_name in ("knn", "knn_std", "linear", "linear_std"):
        assert saved["results"][f"student/{probe_name}/test"] == pytest.approx(
            final[f"student/{probe_name}/test"], abs=1e-6), probe_name


def test_probe_outputs_are_unique_per_student_and_fall_back_when_read_only(finished_run, tiny_dataset, tmp_path,
                                                                           capsys, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    for parent in ("a", "b"):  # two save_pretrained folders, both called `student`
        shutil.copytree(finished_run / "student", tmp_path / parent / "student")
        assert probe.main(["--student", f"{parent}/student", "--dataset", str(tiny_dataset), "--no-teacher",
                           "--probe-epochs", "1"]) == 0
    written = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(written) == 2 and all(name.startswith("probe-student-") for name in written), written
    # a read-only run folder: the results go to runs/ instead, said in one line, and the run is untouched
    before = snapshot(finished_run)
    real = utils.cli.writable
    monkeypatch.setattr(utils.cli, "writable", lambda folder: not str(Path(folder).resolve()).startswith(
        str(finished_run.resolve())) and real(folder))
    capsys.readouterr()
    assert probe.main(["--student", str(finished_run), "--no-teacher", "--probe-epochs", "1"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not writable" in notes[0], notes
    assert snapshot(finished_run) == before
    assert len(list((tmp_path / "runs").glob("probe-run-*/probe_results.json"))) == 1


# ------------------------------------------------------------------------------ 5. caches cannot run code
class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_a_planted_cache_file_runs_no_code_and_is_rebuilt(tiny_dataset, tmp_path, capsys):
    global MARKER
    MARKER = tmp_path / "code-ran"
    first = load_dataset(str(tiny_dataset))
    caches = sorted(default_cache_dir().glob("*.pt"))
    assert len(caches) == 2
    for path in caches:
        path.write_bytes(pickle.dumps({"images": Planted()}))
    capsys.readouterr()
    again = load_dataset(str(tiny_dataset))
    assert not MARKER.exists(), "loading the cache executed code"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "unreadable dataset cache" in warnings[0]
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, again.test.labels)
    assert torch.load(caches[0], weights_only=True)["images"].dtype == torch.uint8  # rebuilt in the safe format


@pytest.mark.parametrize("argv", [["imp.py", "--student", "x", "--output-dir", "{file}"],
                                  ["lmc.py", "--student", "x", "--output-dir", "{file}/sub"],
                                  ["reproduce.py", "run", "fig4", "--runs", "{file}"]])
def test_the_other_scripts_refuse_a_file_as_output_folder_before_any_work(argv, tmp_path):
    (tmp_path / "file").write_text("not a folder\n")
    done = subprocess.run([sys.executable, *[a.format(file=tmp_path / "file") for a in argv]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "is a file" in lines[0], done.stderr
    assert (tmp_path / "file").read_text() == "not a folder\n"
