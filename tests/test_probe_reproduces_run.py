"""probe.py on a run folder reproduces the run's own probes exactly: the same features bit for bit (the run's
channels_last layout, which changes the convolutions' summation order, is reused), hence the same accuracies."""
import json

import pandas as pd
import torch

import probe
import train_distill
from utils.probing import probe_features

RESNET = ["--model", "resnet18", "--width", "0.125", "--hidden-dims", "16", "--bottleneck-dim", "8", "--out-dim", "16",
          "--batch-size", "64", "--epochs", "1", "--probe-epochs", "2", "--knn-k", "5", "--probe-standardized",
          "--checkpoint-every", "0"]


def spy(seen: dict):
    def wrapped(train, evals, num_classes, args, prefix):
        seen[prefix] = train[0].clone()  # the last call per subject: the final student
        return probe_features(train, evals, num_classes, args, prefix)
    return wrapped


def test_probe_py_reproduces_a_resnet18_runs_probes_exactly(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    in_run, in_probe = {}, {}
    monkeypatch.setattr(train_distill, "probe_features", spy(in_run))
    assert train_distill.main(RESNET + ["--dataset", str(tiny_dataset), "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["channels_last"] is True  # resnet18's default
    monkeypatch.setattr(probe, "probe_features", spy(in_probe))
    assert probe.main(["--student", str(out)]) == 0
    for subject in ("teacher", "student"):
        assert torch.equal(in_probe[subject], in_run[subject]), subject
    df = pd.read_csv(out / "metrics.csv")
    last = {"teacher": 0, "student": df.epoch.max()}
    results = json.loads((out / "probes" / tiny_dataset.name / "probe_results.json").read_text())["results"]
    assert len(results) == 2 * 4
    for metric, value in results.items():
        row = df[(df.metric == metric) & (df.epoch == last[metric.split("/")[0]])]
        assert value == row.value.item(), metric  # exactly: the run wrote repr-exact floats
