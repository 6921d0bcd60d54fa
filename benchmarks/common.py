"""Helpers shared by the benchmark scripts: device sync, load average, and the plain PIL dataset."""
from __future__ import annotations

from pathlib import Path

import torch


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_avg() -> str:
    """1-minute load average (benchmarks print it: the machines are shared)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


class PILImages(torch.utils.data.Dataset):
    """What a plain pipeline holds: a list of PIL images and a torchvision transform applied per item."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, transform):
        from PIL import Image

        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images_u8]
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]
