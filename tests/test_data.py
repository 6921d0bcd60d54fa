"""utils/data.py: the built-in digits, local Hub-format datasets through the one loading path, the decoded-tensor
cache, one-line errors naming the flag, and the subset / batching helpers."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_parquet_dataset

from utils import data as D
from utils.cli import UsageError

N_TRAIN, N_TEST = 48, 24  # small local datasets: every format holds build_digits(N_TRAIN, N_TEST)


# ------------------------------------------------------------------------------------------ built-in digits
def _tight(canvas: np.ndarray):
    """Top-left corner and content of the smallest box holding every non-zero pixel."""
    rows, cols = np.flatnonzero(canvas.any(1)), np.flatnonzero(canvas.any(0))
    return (rows[0], cols[0]), canvas[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@pytest.fixture(scope="module")
def digits_built():
    return D.build_digits(), D.build_digits()


def test_digits_deterministic_shapes_and_balance(digits_built):
    (train, test), (train2, test2) = digits_built
    for a, b in ((train, train2), (test, test2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.images.dtype == test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.shape == (5000,) and test.labels.shape == (1000,)
    for split in (train, test):  # grayscale replicated to three equal channels
        assert torch.equal(split.images[:, 0], split.images[:, 1]) and torch.equal(split.images[:, 0],
                                                                                    split.images[:, 2])
    for split, n in ((train, 5000), (test, 1000)):
        counts = torch.bincount(split.labels, minlength=10)
        assert len(counts) == 10 and counts.min() >= 0.8 * n / 10 and counts.max() <= 1.2 * n / 10, counts
    other_train, _ = D.build_digits(seed=1)
    assert not torch.equal(other_train.images, train.images)  # the seed matters


def test_digits_are_sklearn_sources_on_black_canvas_with_disjoint_train_test(digits_built):
    from sklearn.datasets import load_digits

    (train, test), _ = digits_built
    src = load_digits()
    source_keys = {}  # tight content (in source units) -> source indices (a list in case of duplicate digits)
    source_offsets = []
    for i, img in enumerate(src.images.astype(np.uint8)):
        offset, content = _tight(img)
        source_keys.setdefault((content.shape, content.tobytes()), []).append(i)
        source_offsets.append(offset)

    levels = np.unique(train.images[:, 0].numpy())
    # 17 source grey levels (0..16) map one-to-one and increasingly onto canvas values, black stays 0, full range
    assert len(levels) == 17 and levels[0] == 0 and levels[-1] == 255, levels
    to_source_units = np.zeros(256, dtype=np.uint8)
    to_source_units[levels] = np.arange(17)

    def recover(split):
        used, corners = [], set()
        for canvas, label in zip(split.images[:, 0].numpy(), split.labels.tolist()):
            (r, c), content = _tight(canvas)
            h, w = content.shape
            assert h % 2 == 0 and w % 2 == 0 and h <= 16 and w <= 16
            small = content[::2, ::2]
            assert np.array_equal(small.repeat(2, 0).repeat(2, 1), content)  # nearest 2x upscaling
            matches = source_keys.get((small.shape, to_source_units[small].tobytes()))
            assert matches, "a canvas does not hold any sklearn digit"
            assert {int(src.target[m]) for m in matches} == {label}
            i = matches[0]
            corner = (r - 2 * source_offsets[i][0], c - 2 * source_offsets[i][1])  # where the 16x16 window sits
            assert 0 <= corner[0] <= 16 and 0 <= corner[1] <= 16
            corners.add(corner)
            used.append(tuple(matches))
        return used, corners

    train_used, train_corners = recover(train)
    test_used, test_corners = recover(test)
    assert len(train_corners) > 100 and len(test_corners) > 50  # random positions
    ambiguous = {m for ms in train_used + test_used if len(ms) > 1 for m in ms}
    train_src = {m for ms in train_used for m in ms} - ambiguous
    test_src = {m for ms in test_used for m in ms} - ambiguous
    assert not train_src & test_src, f"{len(train_src & test_src)} source digits are in both train and test"
    assert len(train_src | test_src | ambiguous) == len(src.images)  # every source digit is used
    for used in (train_used, test_used):  # each source about equally often
        counts = np.unique(np.array([ms[0] for ms in used]), return_counts=True)[1]
        assert counts.max() - counts.min() <= 1


def test_load_dataset_digits_matches_builder(digits_built):
    (train, test), _ = digits_built
    ds = D.load_dataset("digits")
    assert ds.num_classes == 10 and ds.image_size == 32
    assert torch.equal(ds.train.images, train.images) and torch.equal(ds.test.labels, test.labels)
    pixels = train.images.double() / 255
    np.testing.assert_allclose(ds.mean, pixels.mean((0, 2, 3)).numpy(), rtol=1e-4)
    np.testing.assert_allclose(ds.std, pixels.std((0, 2, 3), unbiased=False).numpy(), rtol=1e-4)


# -------------------------------------------------------------------------------- local Hub-format datasets
def _write_imagefolder(root: Path, splits) -> Path:
    """`<root>/<split>/<class>/<index>.png`, odd images saved as grayscale ('L'), even ones as RGB."""
    from PIL import Image

    for name, split in splits.items():
        for i, (img, y) in enumerate(zip(split.images, split.labels.tolist())):
            folder = root / name / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            (pil.convert("L") if i % 2 else pil).save(folder / f"{i:05d}.png")
    return root


def _write_save_to_disk(root: Path, splits) -> Path:
    """A DatasetDict saved with save_to_disk: grayscale PIL images, plain integer labels (no ClassLabel)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"pixels": datasets.Image(), "y": datasets.Value("int64")})
    dd = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"pixels": [Image.fromarray(img[0].numpy(), mode="L") for img in s.images],
                                          "y": s.labels.tolist()}, features=features)
        for name, s in splits.items()})
    dd.save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def reference():
    train, test = D.build_digits(N_TRAIN, N_TEST)
    assert set(train.labels.tolist()) == set(range(10))  # so every format must report 10 classes
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def formats(tmp_path_factory, reference):
    """The same images in three layouts, with the column names each needs."""
    root = tmp_path_factory.mktemp("formats")
    return {
        "parquet": (write_parquet_dataset(root / "parquet", N_TRAIN, N_TEST, image_column="picture",
                                          label_column="digit", mode="L"),
                    {"image_column": "picture", "label_column": "digit"}),
        "imagefolder": (_write_imagefolder(root / "imagefolder", reference), {}),
        "save_to_disk": (_write_save_to_disk(root / "save_to_disk", reference),
                         {"image_column": "pixels", "label_column": "y"}),
    }


def _canonical(split):
    """Rows sorted by (label, pixels): imagefolder lists files class by class, so compare order-free there."""
    keys = [(y, img.numpy().tobytes()) for img, y in zip(split.images, split.labels.tolist())]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return split.images[order], split.labels[order]


def _no_source(*_, **__):
    raise RuntimeError("the source was opened although its decoded tensors are cached")


@pytest.mark.parametrize("fmt", ["parquet", "imagefolder", "save_to_disk"])
def test_local_formats_load_identically_and_cache(fmt, formats, reference, monkeypatch):
    import datasets

    folder, columns = formats[fmt]
    ds = D.load_dataset(str(folder), **columns)
    assert ds.num_classes == 10 and ds.image_size == 32
    for name in ("train", "test"):
        got, want = getattr(ds, name), reference[name]
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        assert got.images.shape == want.images.shape and got.labels.shape == want.labels.shape
        if fmt == "imagefolder":
            got_images, got_labels = _canonical(got)
            want_images, want_labels = _canonical(want)
        else:  # parquet and save_to_disk keep the row order
            (got_images, got_labels), (want_images, want_labels) = (got.images, got.labels), (want.images,
                                                                                             want.labels)
        # grayscale sources come out as three identical channels equal to the RGB version
        assert torch.equal(got_images, want_images)
        assert torch.equal(got_labels, want_labels)
    pixels = reference["train"].images.double() / 255
    np.testing.assert_allclose(ds.mean, pixels.mean((0, 2, 3)).numpy(), rtol=1e-4)
    np.testing.assert_allclose(ds.std, pixels.std((0, 2, 3), unbiased=False).numpy(), rtol=1e-4)

    cache = Path(os.environ["RANDOM_TEACHERS_CACHE"])
    assert len(list(cache.glob("*.pt"))) == 2  # one decoded file per split

    # a second load is served from the decoded tensors: the dataset libraries are never asked again
    monkeypatch.setattr(datasets, "load_dataset", _no_source)
    monkeypatch.setattr(datasets, "load_from_disk", _no_source)
    again = D.load_dataset(str(folder), **columns)
    assert torch.equal(again.train.images, ds.train.images) and torch.equal(again.test.labels, ds.test.labels)
    assert again.num_classes == ds.num_classes and again.mean == ds.mean and again.std == ds.std

    # ... but a changed folder is decoded again, not served stale
    some_file = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    stat = some_file.stat()
    os.utime(some_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(RuntimeError, match="cached"):
        D.load_dataset(str(folder), **columns)


def test_hub_id_offline_is_served_from_the_decoded_cache(tiny_dataset, monkeypatch):
    """A Hub id decoded once (here: a fake download) loads with HF_HUB_OFFLINE=1 without touching the Hub."""
    import datasets

    real = datasets.load_dataset
    calls = []

    def fake_download(path, split=None, revision=None, **kwargs):
        calls.append((path, split))
        return real(str(tiny_dataset), split=split)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)  # restored after
    monkeypatch.setattr(datasets, "load_dataset", fake_download)
    first = D.load_dataset("someone/tiny-digits")
    assert calls == [("someone/tiny-digits", "train"), ("someone/tiny-digits", "test")]
    monkeypatch.setattr(datasets, "load_dataset", _no_source)
    second = D.load_dataset("someone/tiny-digits")
    assert torch.equal(first.train.images, second.train.images) and len(second.test) == 128
    assert first.meta["source"] == "someone/tiny-digits"


# --------------------------------------------------------------------------------------------------- errors
def _usage_error(flag, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        D.load_dataset(*args, **kwargs)
    message = str(info.value)
    assert info.value.flag == flag, message
    assert flag in message and "\n" not in message and message.strip()
    return message


@pytest.mark.parametrize("fmt", ["parquet", "imagefolder", "save_to_disk"])
def test_missing_columns_and_splits_name_the_flag(fmt, formats):
    folder, columns = formats[fmt]
    image_column, label_column = columns.get("image_column"), columns.get("label_column")
    assert "nope" in _usage_error("--image-column", str(folder), image_column="nope", label_column=label_column)
    assert "nope" in _usage_error("--label-column", str(folder), image_column=image_column, label_column="nope")
    assert "validation" in _usage_error("--train-split", str(folder), **columns, train_split="validation")
    assert "heldout" in _usage_error("--test-split", str(folder), **columns, test_split="heldout")


def test_single_saved_dataset_is_not_used_as_both_splits(tmp_path, reference):
    """`Dataset.save_to_disk` (no DatasetDict) has no named splits: it must not silently serve train AND test."""
    import datasets
    from PIL import Image

    single = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(img[0].numpy(), mode="L") for img in reference["train"].images],
         "label": reference["train"].labels.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    single.save_to_disk(str(tmp_path / "single"))
    _usage_error("--train-split", str(tmp_path / "single"))


def test_unknown_names_name_the_flag(tmp_path):
    assert "nosuchdata" in _usage_error("--dataset", "nosuchdata")
    message = _usage_error("--dataset", str(tmp_path / "no" / "such" / "folder"))
    assert "prefetch" not in message  # a mistyped local path is not a download problem
    (tmp_path / "file.parquet").write_bytes(b"")
    _usage_error("--dataset", str(tmp_path / "file.parquet"))


def test_unreachable_hub_dataset_fails_fast_offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)  # restored after
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    started = time.monotonic()
    message = _usage_error("--dataset", "someone/not-cached-dataset")
    assert time.monotonic() - started < 10
    assert "someone/not-cached-dataset" in message
    assert "prefetch" in message and "HF_HUB_OFFLINE" in message


# ----------------------------------------------------------------------------------- subsets and batching
def _labels(counts, seed=0):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_class_balanced_subset():
    labels = _labels([30, 25, 40, 12, 33])
    for n in (5, 37, 59, 60):
        index = D.class_balanced_subset(labels, n, seed=3)
        assert len(index) == n and len(set(index.tolist())) == n
        assert index.min() >= 0 and index.max() < len(labels)
        counts = torch.bincount(labels[index], minlength=5)
        assert counts.max() - counts.min() <= 1, counts
        assert torch.equal(index, D.class_balanced_subset(labels, n, seed=3))  # deterministic per seed
    assert not torch.equal(D.class_balanced_subset(labels, 37, seed=3), D.class_balanced_subset(labels, 37, seed=4))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(D.class_balanced_subset(labels, 37, seed=3), D.class_balanced_subset(labels, 37, seed=3))
    for too_many in (len(labels) + 1, 70):  # more than the split, or more than the smallest class (12) gives
        with pytest.raises(UsageError) as info:
            D.class_balanced_subset(labels, too_many, seed=0)
        assert info.value.flag == "--train-subset"


def test_validation_split():
    train, val = D.validation_split(100, 17, seed=5)
    assert len(val) == 17 and len(train) == 83
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again = D.validation_split(100, 17, seed=5)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, D.validation_split(100, 17, seed=6)[1])
    with pytest.raises(UsageError) as info:
        D.validation_split(100, 100, seed=0)
    assert info.value.flag == "--val-size"


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalizer(channels_last):
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.05)
    x = D.Normalizer(mean, std, "cpu", channels_last)(images)
    expected = (images.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / \
        torch.tensor(std).double().view(1, 3, 1, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_epoch_order():
    order = D.epoch_order(50, seed=2, epoch=3)
    assert sorted(order.tolist()) == list(range(50))
    torch.manual_seed(999)  # depends on (seed, epoch) only, not on the global RNG
    assert torch.equal(order, D.epoch_order(50, seed=2, epoch=3))
    assert not torch.equal(order, D.epoch_order(50, seed=2, epoch=4))
    assert not torch.equal(order, D.epoch_order(50, seed=3, epoch=3))


@pytest.mark.parametrize("n,batch,world,sizes", [(10, 4, 1, [4, 4, 2]), (9, 4, 1, [4, 4]), (13, 4, 2, [4, 4, 4]),
                                                  (14, 4, 2, [4, 4, 4]), (16, 4, 2, [4, 4, 4, 4]), (3, 8, 2, [3])])
def test_epoch_batches_keep_the_remainder_unless_too_small_for_batchnorm(n, batch, world, sizes):
    batches = D.epoch_batches(n, batch, seed=1, epoch=2, world=world)
    assert [len(b) for b in batches] == sizes
    order = D.epoch_order(n, seed=1, epoch=2)
    assert torch.equal(torch.cat(batches), order[:sum(sizes)])  # the epoch's order, in batches


@pytest.mark.parametrize("n,world", [(64, 1), (64, 2), (67, 4), (5, 3), (2, 3)])
def test_rank_slice_reassembles_the_batch(n, world):
    batch = torch.randperm(1000)[:n]
    parts = [D.rank_slice(batch, rank, world) for rank in range(world)]
    assert torch.equal(torch.cat(parts), batch)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_noise_inputs():
    a = D.noise_inputs(200, 16, seed=1, device="cpu")
    torch.manual_seed(7)
    assert a.shape == (200, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, D.noise_inputs(200, 16, seed=1, device="cpu"))
    assert not torch.equal(a, D.noise_inputs(200, 16, seed=2, device="cpu"))
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1) < 0.02
    assert abs(a.mean((0, 2, 3))).max() < 0.05  # every channel is centred
