"""Dataset registry, decoding each split once to a cached uint8 tensor, built-in digits, device-side batching.

A split is held as `images` (uint8, N x 3 x H x W) and `labels` (int64, N). Training and probing index into
these tensors on the device and normalise on the fly: no DataLoader, no PIL per step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from utils.choices import BUILT_IN
from utils.cli import UsageError
from utils.results import atomic_path

PREFETCH_HINT = ("prefetch it on a machine with internet (e.g. a login node) with "
                 "`python -c \"from utils.data import prefetch; prefetch('{name}')\"` using the same "
                 "--data-cache / HF_HOME, then run with HF_HUB_OFFLINE=1")


@dataclass(frozen=True)
class DatasetSpec:
    repo: str | None
    image_column: str | None
    label_column: str | None
    train_split: str = "train"
    test_split: str = "test"
    image_size: int | None = None


REGISTRY = {  # docs/method.md, Data
    "cifar10": DatasetSpec("uoft-cs/cifar10", "img", "label", image_size=32),
    "cifar100": DatasetSpec("uoft-cs/cifar100", "img", "fine_label", image_size=32),
    "stl10": DatasetSpec("jxie/stl10", "image", "label", image_size=96),
    "tinyimagenet": DatasetSpec("zh-plus/tiny-imagenet", "image", "label", test_split="valid", image_size=64),
    "digits": DatasetSpec(None, None, None, image_size=32),
    "photos": DatasetSpec(None, None, None, image_size=32),
}


@dataclass
class Split:
    images: torch.Tensor  # uint8 N x 3 x H x W
    labels: torch.Tensor  # int64 N

    def __len__(self):
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class ImageDataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, float, float]  # per-channel, computed on the train split, in [0, 1] units
    std: tuple[float, float, float]
    meta: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ------------------------------------------------------------------------------------------ built-in digits
def build_digits(n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> tuple[Split, Split]:
    """docs/method.md, Data: the 1,797 8x8 UCI digits bundled with scikit-learn, upscaled 2x (nearest) and pasted at a
    random position on a black 32x32 canvas. Train and test canvases come from disjoint source digits
    (a fixed, per-class 80/20 split of the sources). Fully deterministic for a given seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    sources = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)
    targets = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_pool, test_pool = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(targets == c))
        cut = int(round(0.8 * len(members)))
        train_pool += list(members[:cut])
        test_pool += list(members[cut:])

    def canvases(pool, n):
        chosen = np.resize(rng.permutation(np.array(pool)), n)  # every source used about equally often
        out = np.zeros((n, 32, 32), dtype=np.uint8)
        ys, xs = rng.integers(0, 32 - 16 + 1, size=(2, n))
        for i, (src, y, x) in enumerate(zip(chosen, ys, xs)):
            out[i, y:y + 16, x:x + 16] = sources[src]
        images = torch.from_numpy(out)[:, None].expand(-1, 3, -1, -1).contiguous()  # grayscale -> RGB
        return Split(images, torch.from_numpy(targets[chosen]))

    return canvases(train_pool, n_train), canvases(test_pool, n_test)


# ------------------------------------------------------------------------------------------ built-in photos
# The 19 camera-captured photographs inside the scikit-image wheel (skimage/data/), one class each. Left out:
# the synthetic images (chessboards, color wheel, logo, phantom, horse silhouette) and motorcycle_right (the
# same scene as motorcycle_left). Provenance and licences: README, "Data".
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
          "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")


def load_photos() -> list[np.ndarray]:
    """The PHOTOS as H x W x 3 uint8 arrays (grayscale -> RGB), read from the installed scikit-image."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for name in PHOTOS:
        with Image.open(folder / name) as img:
            photos.append(np.asarray(img.convert("RGB")))
    return photos


def photo_crop_boxes(shapes, n_train: int = 5000, n_test: int = 1000, seed: int = 0, size: int = 32):
    """Where the `photos` crops come from: for train and test, an int64 array of rows (label, y, x, side) in
    the coordinates of photograph `label`, and the half (y0, y1, x0, x1) of each photograph each split uses.

    Each photograph is cut in two halves across its longer side; which half trains is a seeded coin flip, so
    train and test crops never share a pixel. Crop sides are log-uniform in [size, the half's shorter side],
    positions uniform inside the half, labels balanced (counts differ by at most one) in a shuffled order."""
    rng = np.random.default_rng(seed)
    halves = {"train": [], "test": []}
    for h, w in shapes:
        cut = [(0, h // 2, 0, w), (h // 2, h, 0, w)] if h >= w else [(0, h, 0, w // 2), (0, h, w // 2, w)]
        first = int(rng.integers(2))
        halves["train"].append(cut[first])
        halves["test"].append(cut[1 - first])
    boxes = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(shapes)
        rng.shuffle(labels)
        rows = []
        for label in labels:
            y0, y1, x0, x1 = halves[split][label]
            side = int(round(np.exp(rng.uniform(np.log(size), np.log(min(y1 - y0, x1 - x0))))))
            rows.append((label, y0 + rng.integers(0, y1 - y0 - side + 1), x0 + rng.integers(0, x1 - x0 - side + 1),
                         side))
        boxes[split] = np.array(rows, dtype=np.int64)
    return boxes, halves


def render_crops(photos, boxes: np.ndarray, size: int = 32) -> Split:
    """Cut each box out of its photograph and area-resample it (PIL box filter) to size x size."""
    from PIL import Image

    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (label, y, x, side) in enumerate(boxes):
        crop = Image.fromarray(photos[label][y:y + side, x:x + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BOX) if side != size else crop)
    return Split(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(boxes[:, 0].copy()))


def build_photos(n_train: int = 5000, n_test: int = 1000, seed: int = 0, size: int = 32) -> tuple[Split, Split]:
    """docs/method.md: `size`x`size` crops at random scales and positions of the photographs bundled with scikit-image,
    label = source photograph, train and test crops from disjoint halves (see photo_crop_boxes). A pure
    function of the seed: no download, no randomness outside it."""
    photos = load_photos()
    boxes, _ = photo_crop_boxes([p.shape[:2] for p in photos], n_train, n_test, seed, size)
    return render_crops(photos, boxes["train"], size), render_crops(photos, boxes["test"], size)


def load_builtin(name: str) -> "ImageDataset":
    if name == "digits":
        train, test = build_digits()
        return _finish("digits", train, test, 10, {"source": "sklearn UCI digits (built in)"})
    train, test = build_photos()
    return _finish("photos", train, test, len(PHOTOS), {"source": "scikit-image bundled photographs (built in)",
                                                         "class_names": [Path(p).stem for p in PHOTOS]})


# --------------------------------------------------------------------------------------- generic loading
def default_cache_dir() -> Path:
    return Path(os.environ.get("RANDOM_TEACHERS_CACHE", Path.home() / ".cache" / "random_teachers"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so an offline machine fails in seconds rather than retrying."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_save_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _folder_fingerprint(path: Path) -> str:
    stats = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.rglob("*") if p.is_file())
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()


@contextlib.contextmanager
def _no_datasets_progress_bars():
    import datasets

    toggle = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and not datasets.are_progress_bars_disabled()
    if toggle:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if toggle:
            datasets.enable_progress_bars()


def _open_split(source: str, split: str, revision: str | None, split_flag: str):
    """Return a `datasets.Dataset` for one split of a Hub id or a local folder."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and _is_save_to_disk(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UsageError(split_flag, f"split {split!r} not in {source} (has: {', '.join(ds)})")
                ds = ds[split]
            elif str(ds.split) != split:  # a single saved Dataset: never reuse one split as both train and test
                raise UsageError(split_flag, f"{source} holds a single Dataset (split {ds.split}), not {split!r}; "
                                             "save a DatasetDict with both the train and the test split")
            return ds
        if path.is_dir():
            with _no_datasets_progress_bars():  # a local folder is quick; keep stderr for errors
                return datasets.load_dataset(str(path), split=split)
        if not hub_reachable():
            datasets.config.HF_HUB_OFFLINE = True  # use the local HF cache only, no retries
        return datasets.load_dataset(source, split=split, revision=revision)
    except UsageError:
        raise
    except ValueError as err:
        if "split" in str(err).lower():
            raise UsageError(split_flag, f"{source}: {err}") from None
        raise
    except (ConnectionError, OSError) as err:  # offline / unreachable / not found
        if path.exists() and isinstance(err, FileNotFoundError):  # datasets' "no data files", e.g. empty folder
            raise UsageError("--dataset", f"{source}: {str(err).splitlines()[0][:200]}") from None
        if path.exists():
            raise
        raise UsageError("--dataset", f"{source!r} could not be loaded ({type(err).__name__}: "
                                      f"{str(err).splitlines()[0][:200]}); " + PREFETCH_HINT.format(name=source)) from None


def _pick_column(ds, wanted: str | None, flag: str, kind: str) -> str:
    import datasets

    names = list(ds.features)
    if wanted:
        if wanted not in names:
            raise UsageError(flag, f"column {wanted!r} not found (columns: {', '.join(names)})")
        return wanted
    if kind == "image":
        found = [n for n, f in ds.features.items() if isinstance(f, datasets.Image)]
    else:
        found = [n for n, f in ds.features.items() if isinstance(f, datasets.ClassLabel)] or \
                [n for n in ("label", "labels", "fine_label") if n in names]
    if not found:
        raise UsageError(flag, f"no {kind} column found automatically (columns: {', '.join(names)}); name it")
    return found[0]


def _decode(ds, image_column: str, label_column: str, image_size: int | None, chunk: int = 2048):
    """Decode an image column to one uint8 N x 3 x H x W tensor (grayscale -> RGB) and labels to int64."""
    import datasets
    from PIL import Image as PILImage

    ds = ds.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image(mode="RGB"))
    ds = ds.with_format("numpy")
    images, labels = [], []
    for start in range(0, len(ds), chunk):
        try:
            batch = ds[start:start + chunk]
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for a truncated or non-image file
            raise UsageError("--dataset", _unreadable_image(ds, image_column, start, chunk, err)) from None
        arrays = list(batch[image_column]) if not isinstance(batch[image_column], np.ndarray) or \
            batch[image_column].dtype == object else batch[image_column]
        size = image_size or (arrays[0].shape[0] if not images else images[0].shape[-1])
        if isinstance(arrays, list) or arrays.shape[1:3] != (size, size):
            arrays = np.stack([np.asarray(PILImage.fromarray(a).resize((size, size), PILImage.BILINEAR))
                               if a.shape[:2] != (size, size) else a for a in arrays])
        images.append(torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).contiguous())
        labels.append(np.asarray(batch[label_column]))
    return torch.cat(images), np.concatenate(labels)


def _unreadable_image(ds, image_column: str, start: int, chunk: int, err: Exception) -> str:
    """Name the first image of a failed chunk that does not decode (its file, where the dataset knows it)."""
    import datasets

    raw = ds.cast_column(image_column, datasets.Image(decode=False)).with_format(None)
    for i in range(start, min(start + chunk, len(ds))):
        try:
            ds[i]
        except (OSError, ValueError, SyntaxError) as row_err:
            where = raw[i][image_column].get("path") or f"row {i} of the split"
            return f"image {where} cannot be decoded ({type(row_err).__name__}: {row_err}); fix or remove it"
    return f"images {start}-{start + chunk} cannot be decoded ({type(err).__name__}: {err})"


def _load_split_uncached(source, split, split_flag, image_column, label_column, revision, image_size):
    import datasets

    ds = _open_split(source, split, revision, split_flag)
    if len(ds) == 0:
        raise UsageError(split_flag, f"split {split!r} of {source} holds no images")
    image_column = _pick_column(ds, image_column, "--image-column", "image")
    label_column = _pick_column(ds, label_column, "--label-column", "label")
    feature = ds.features[label_column]
    images, labels = _decode(ds, image_column, label_column, image_size)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    return images, labels, names


def _encode_labels(train_y: np.ndarray, test_y: np.ndarray, names: list | None):
    """int64 label tensors (and class names); non-integer labels become indices into their sorted set."""
    if train_y.dtype.kind in "iu" and test_y.dtype.kind in "iu":
        return torch.as_tensor(train_y.astype(np.int64)), torch.as_tensor(test_y.astype(np.int64)), names
    names = sorted(set(train_y.tolist()) | set(test_y.tolist()))
    index = {name: i for i, name in enumerate(names)}
    return (torch.tensor([index[v] for v in train_y.tolist()]), torch.tensor([index[v] for v in test_y.tolist()]),
            names)


def load_dataset(name: str, image_column=None, label_column=None, train_split=None, test_split=None,
                 revision=None, image_size=None, cache_dir=None) -> ImageDataset:
    """Load a registered name, Hub id or local folder into uint8 tensors, decoding each split at most once."""
    if name in BUILT_IN:
        return load_builtin(name)
    spec = REGISTRY.get(name)
    if spec is None and "/" not in name and not Path(name).exists():
        raise UsageError("--dataset", f"unknown dataset {name!r}: not built in ({', '.join(REGISTRY)}), "
                                      "not a local folder, and not a Hub id (owner/name)")
    if spec is None and not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise UsageError("--dataset", f"no such local folder {name!r} (and not a Hub id of the form owner/name)")
    spec = spec or DatasetSpec(None, None, None)
    source = spec.repo or name
    if Path(source).exists() and not Path(source).is_dir():
        raise UsageError("--dataset", f"{source} is a file; pass the folder that holds the dataset")
    image_column, label_column = image_column or spec.image_column, label_column or spec.label_column
    image_size = image_size or spec.image_size
    splits = {"--train-split": train_split or spec.train_split, "--test-split": test_split or spec.test_split}
    local = Path(source).is_dir()
    key_source = str(Path(source).resolve()) + _folder_fingerprint(Path(source)) if local else f"{source}@{revision}"
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    loaded = {}
    for flag, split in splits.items():
        key = hashlib.sha1(json.dumps([key_source, split, image_column, label_column, image_size]).encode())
        path = cache / f"{Path(source).name}-{split}-{key.hexdigest()[:16]}.pt"
        loaded[flag] = _read_cache(path)
        if loaded[flag] is not None:
            continue
        images, labels, names = _load_split_uncached(source, split, flag, image_column, label_column, revision,
                                                     image_size)
        loaded[flag] = {"images": images, "labels": labels, "names": names}
        with atomic_path(path) as tmp:  # labels as a tensor or a list: loadable with weights_only=True
            torch.save({"images": images, "names": names, "labels": torch.from_numpy(labels) if labels.dtype.kind
                        in "iub" else labels.tolist()}, tmp)
    train, test = loaded["--train-split"], loaded["--test-split"]
    train_labels, test_labels, names = _encode_labels(train["labels"], test["labels"], train["names"])
    train_split_, test_split_ = Split(train["images"], train_labels), Split(test["images"], test_labels)
    num_classes = len(names) if names else int(max(train_split_.labels.max(), test_split_.labels.max())) + 1
    meta = {"source": source, "revision": revision, "splits": list(splits.values()), "class_names": names}
    return _finish(name, train_split_, test_split_, num_classes, meta)


def _read_cache(path: Path) -> dict | None:
    """A decoded split from the cache, or None (absent, or unreadable: then it is rebuilt, with a warning).
    weights_only=True: a cache file planted on a shared cluster cannot run code when it is loaded."""
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch's own notes on an odd pickle: the one line below says it all
            warnings.simplefilter("ignore")
            cached = torch.load(path, weights_only=True)
        labels = cached["labels"]
        return cached | {"labels": labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)}
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
        print(f"warning: ignoring the unreadable dataset cache {path} ({type(err).__name__}); decoding again",
                      file=sys.stderr)
        return None


def _finish(name, train: Split, test: Split, num_classes: int, meta: dict) -> ImageDataset:
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UsageError("--image-size", f"train images are {tuple(train.images.shape[1:])} but test images "
                                         f"are {tuple(test.images.shape[1:])}; pass --image-size to resize both")
    pixels = train.images.double().div_(255).transpose(0, 1).reshape(3, -1)
    mean, std = pixels.mean(1), pixels.std(1, unbiased=False)
    return ImageDataset(name, train, test, num_classes, tuple(mean.tolist()), tuple(std.tolist()), meta)


def prefetch(name: str, **kwargs) -> ImageDataset:
    """Download and decode a dataset into the caches (run on a machine with internet)."""
    return load_dataset(name, **kwargs)


# ----------------------------------------------------------------------------------- subsets and batching
def class_balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a deterministic class-balanced subset of size n (remainder to the lowest classes)."""
    classes = torch.unique(labels)
    if n > len(labels):
        raise UsageError("--train-subset", f"asked for {n} images but the split has {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picked = []
    for c, k in zip(classes.tolist(), per_class):
        members = order[labels[order] == c]
        if k > len(members):
            raise UsageError("--train-subset", f"class {c} has only {len(members)} images, {k} needed")
        picked.append(members[:k])
    return torch.cat(picked).sort().values


def validation_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_index, val_index): a seeded random hold-out of val_size images."""
    if not 0 <= val_size < n:
        raise UsageError("--val-size", f"must be in [0, {n - 1}], got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return order[val_size:].sort().values, order[:val_size].sort().values


class Normalizer:
    """uint8 -> float: (x / 255 - mean) / std, folded into one multiply-add on the device."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        mean, std = torch.tensor(mean, device=device), torch.tensor(std, device=device)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images_u8.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)


def noise_inputs(n: int, image_size: int, seed: int, device) -> torch.Tensor:
    """A fixed dataset of N(0, 1) images (already 'normalised'): docs/method.md, Data --input-noise / Fig. 5."""
    g = torch.Generator().manual_seed(seed + 104729)
    return torch.randn(n, 3, image_size, image_size, generator=g).to(device)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so any epoch can be replayed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1) -> list[torch.Tensor]:
    """The global batches of one epoch. The last partial batch is kept (as the official loader's
    drop_last=False) unless it has fewer than 2 images per process, which BatchNorm cannot train on."""
    batches = list(epoch_order(n, seed, epoch).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2 * world:
        batches.pop()
    return batches


def rank_slice(batch_index: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of a global batch (contiguous, sizes differ by at most one)."""
    return torch.tensor_split(batch_index, world)[rank]
