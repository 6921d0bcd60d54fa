"""Bad input to the real script, run as a subprocess: exit status 2 and exactly one stderr line naming the flag."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(args, tmp_path, timeout=60):
    env = dict(os.environ, HF_HUB_OFFLINE="1", RANDOM_TEACHERS_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"))  # a fresh Hugging Face cache: local folders are prepared from scratch
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "train_distill.py", *args, "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


CASES = {
    "model": (["--model", "resnet99"], "--model"),
    "dataset": (["--dataset", "nosuchdata"], "--dataset"),
    "alpha": (["--alpha", "1.5"], "--alpha"),
    "image-column": (["--dataset", "{tiny}", "--image-column", "nope"], "--image-column"),
    "test-split": (["--dataset", "{tiny}", "--test-split", "nosuch"], "--test-split"),
    "hub": (["--dataset", "someone/not-cached"], "--dataset"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, tiny_dataset, tmp_path):
    args, flag = CASES[case]
    args = [a.format(tiny=tiny_dataset) for a in args]
    proc, elapsed = run_script(args, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr[-2000:]}"
    assert lines[0].startswith("error:") and flag in lines[0], lines[0]
    assert "\r" not in proc.stderr  # no progress bar drew on stderr before the error
    assert not proc.stdout.strip(), proc.stdout[-2000:]
    assert not (tmp_path / "run").exists()  # nothing was written for a run that never started
    if case == "hub":
        assert elapsed < 15, f"the unreachable Hub dataset took {elapsed:.1f} s to fail"
        assert "prefetch" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
