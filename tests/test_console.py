"""What train_distill.py prints while it runs: the progress bar shows the KL to the teacher (what falls; the CE is
dominated by the teacher's entropy, up to log of the head's output dimension), and every probe is one line of
accuracies in % that equal metrics.csv."""
import re

import pandas as pd

import train_distill
from conftest import TINY_RUN

FLAT = TINY_RUN + ["--alpha", "0.5", "--model", "flatten", "--checkpoint-every", "0"]


def test_bar_shows_the_kl_and_each_probe_is_one_line_in_percent(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_distill.main(FLAT + ["--dataset", str(tiny_dataset), "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    df = pd.read_csv(out / "metrics.csv")

    shown = re.findall(r"kl=([0-9.e+-]+)", captured.err)
    assert shown and "ce=" not in captured.err
    kl = df[df.metric == "train/kl"].value.tolist()
    assert shown[-1] == f"{kl[-1]:.3e}" and all(re.fullmatch(r"\d\.\d{3}e[+-]\d\d", v) for v in shown)

    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    probed = df[df.metric == "student/linear/test"]
    assert [line.split(" |")[0] for line in lines] == [f"epoch {e}, step {s}"
                                                       for e, s in zip(probed.epoch, probed.step)]
    for line, (epoch, step) in zip(lines, zip(probed.epoch, probed.step)):
        rows = df[(df.epoch == epoch) & (df.step == step) & df.metric.str.endswith("/test")]
        parts = dict(part.split(" ", 1) for part in line.split(" | ")[1:])
        assert set(parts) == set(rows.metric.str.split("/").str[0])  # input and teacher at epoch 0 only
        for metric, value in zip(rows.metric, rows.value):
            subject, probe, _ = metric.split("/")
            assert f"{probe} {100 * value:.2f} %" in parts[subject], (metric, line)
