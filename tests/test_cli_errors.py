"""Bad input to the real script, run as a subprocess: exit status 2 and exactly one stderr line naming the flag."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Loaded into the script's process: every attempt to open a network connection is written down (and refused), so a
# test can tell "failed at once, offline" from "failed after network retries" without timing anything.
NO_NETWORK = textwrap.dedent("""
    import os, socket
    def _refuse(self, address, *rest):
        with open(os.environ["RT_CONNECT_LOG"], "a") as log:
            log.write(f"{address}\\n")
        raise OSError("network disabled by the test")
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
""")


def run_script(args, tmp_path, timeout=120):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_NETWORK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RANDOM_TEACHERS_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"),  # a fresh Hugging Face cache: local folders are prepared from scratch
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]),
               RT_CONNECT_LOG=str(tmp_path / "connects.log"))
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    proc = subprocess.run([sys.executable, "train_distill.py", *args, "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = tmp_path / "connects.log"
    return proc, log.read_text().splitlines() if log.exists() else []


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
    proc, connects = run_script(args, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr[-2000:]}"
    assert lines[0].startswith("error:") and flag in lines[0], lines[0]
    assert "\r" not in proc.stderr  # no progress bar drew on stderr before the error
    assert not proc.stdout.strip(), proc.stdout[-2000:]
    assert not (tmp_path / "run").exists()  # nothing was written for a run that never started
    if case == "hub":
        assert connects == [], f"an offline run tried the network: {connects}"  # fails at once, no retries
        assert "prefetch" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
