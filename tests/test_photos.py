"""The built-in `photos` dataset (docs/method.md): deterministic, balanced, train and test from disjoint halves of every
photograph, no network; train_distill.py and probe.py run on it."""
import socket

import numpy as np
import pytest
import torch

import probe
import train_distill
from conftest import TINY_NET
from utils import data as D


@pytest.fixture(scope="module")
def photos_built():
    return D.build_photos(), D.build_photos()


def test_photos_deterministic_shapes_and_balance(photos_built):
    (train, test), (train2, test2) = photos_built
    for a, b in ((train, train2), (test, test2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    for split in (train, test):
        counts = torch.bincount(split.labels, minlength=len(D.PHOTOS))
        assert len(counts) == len(D.PHOTOS) == 19 and counts.max() - counts.min() <= 1, counts
        assert len(torch.unique(split.images.flatten(1), dim=0)) > 0.99 * len(split)  # crops, not copies
    assert not torch.equal(D.build_photos(n_train=50, n_test=10, seed=1)[0].images, train.images[:50])


def test_photos_train_and_test_come_from_disjoint_halves():
    photos = D.load_photos()
    shapes = [p.shape[:2] for p in photos]
    boxes, halves = D.photo_crop_boxes(shapes)
    for label, (h, w) in enumerate(shapes):
        a, b = halves["train"][label], halves["test"][label]
        mask = np.zeros((2, h, w), bool)
        mask[0, a[0]:a[1], a[2]:a[3]] = True
        mask[1, b[0]:b[1], b[2]:b[3]] = True
        assert not (mask[0] & mask[1]).any() and mask.any(0).sum() >= h * w - max(h, w)  # two halves, no overlap
    for split in ("train", "test"):
        for label, y, x, side in boxes[split]:
            y0, y1, x0, x1 = halves[split][label]
            assert y0 <= y and y + side <= y1 and x0 <= x and x + side <= x1 and side >= 32
        sides = boxes[split][:, 3]
        assert sides.min() == 32 and sides.max() > 128  # random scales, from native 32 px to large
    # the boxes are where the images come from: a native-size crop is the photograph's pixels exactly
    train, _ = D.build_photos()
    native = np.flatnonzero(boxes["train"][:, 3] == 32)[:20]
    assert len(native)
    for i in native:
        label, y, x, _ = boxes["train"][i]
        assert np.array_equal(train.images[i].permute(1, 2, 0).numpy(), photos[label][y:y + 32, x:x + 32])


def test_photos_load_with_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("photos tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    ds = D.load_dataset("photos")
    assert ds.num_classes == 19 and ds.meta["class_names"][0] == "astronaut" and len(ds.train) == 5000


def test_train_distill_and_probe_run_on_photos(tmp_path):
    out = tmp_path / "run"
    argv = TINY_NET + ["--width", "0.125", "--dataset", "photos", "--train-subset", "190", "--batch-size", "64",
                       "--epochs", "1", "--probe-epochs", "1", "--output-dir", str(out)]
    assert train_distill.main(argv) == 0
    assert (out / "student" / "model.safetensors").exists() and (out / "summary.json").exists()
    assert probe.main(["--student", str(out), "--probe-epochs", "1", "--output-dir", str(tmp_path / "probe")]) == 0
    assert (tmp_path / "probe" / "probe_table.csv").exists()
