"""Shared fixtures: a tiny local dataset in the Hub's parquet layout, a tiny network configuration and a fake Hub."""
import io
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

# A small head and short schedule: the real code paths at a size that runs in seconds on 2 CPU cores.
TINY_NET = ["--model", "vgg11", "--width", "0.25", "--hidden-dims", "32", "--bottleneck-dim", "8", "--out-dim", "64"]
TINY_RUN = TINY_NET + ["--batch-size", "64", "--epochs", "2", "--probe-epochs", "2", "--log-every", "2"]


def write_parquet_dataset(folder: Path, n_train: int, n_test: int, image_column="image", label_column="label",
                          mode="RGB") -> Path:
    """Digits canvases saved as `<folder>/{train,test}-00000-of-00001.parquet`, like a Hub parquet repo."""
    import datasets
    from PIL import Image

    from utils.data import build_digits

    train, test = build_digits(n_train, n_test)
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({image_column: datasets.Image(),
                                  label_column: datasets.ClassLabel(names=[str(i) for i in range(10)])})
    for name, split in (("train", train), ("test", test)):
        images = []
        for img in split.images:
            pil = Image.fromarray(img.permute(1, 2, 0).numpy()).convert(mode)
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({image_column: images, label_column: split.labels.tolist()},
                                        features=features)
        ds.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """256 train / 128 test digit canvases as a local parquet dataset (standard `image`/`label` columns)."""
    return write_parquet_dataset(tmp_path_factory.mktemp("tiny") / "tiny", 256, 128)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: the CPU is small and shared, and bitwise comparisons between in-process runs
    need the same setting for both runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Decoded-tensor cache per test, so tests never see each other's (or the user's) cache."""
    monkeypatch.setenv("RANDOM_TEACHERS_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------- the fake Hub
class FakeHub:
    """Records what would be uploaded. `fail_first` commits raise (after recording the attempted files)."""

    def __init__(self, fail_first: int = 0):
        self.fail_first, self.repos, self.attempts, self.commits = fail_first, [], [], []

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kw):
        self.repos.append(dict(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, repo_type=None, **kw):
        # read the contents now: the real client uploads during this call (parquet files live in a temp dir)
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
        commit = dict(repo_id=repo_id, files=files, message=commit_message, repo_type=repo_type)
        self.attempts.append(commit)
        if len(self.attempts) <= self.fail_first:
            raise ConnectionError("simulated network failure mid-push")
        self.commits.append(commit)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.commits):040d}")


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    """The Hub client replaced by a FakeHub (the one seam, utils.hub.hub_api): every upload is recorded."""
    import utils.hub

    fake = FakeHub()
    monkeypatch.setattr(utils.hub, "hub_api", lambda: fake)
    return fake
