"""What a grid point costs on a GPU, derived (not measured) from FLOP counts, the precision the point runs at and
its probing schedule, as a low-high range of GPU-hours.

Counted per point: the distillation steps (student forward + backward, the cached teacher's last layer), the
one teacher pass that fills the cache, every probe (features of the probe-train and test images through the
encoder, the linear probe's steps, the k-NN search; the teacher once, the student before training and every
--probe-every epochs), the transfer probes of probe.py, and the start-up of each command. FLOP counts of the
full-size networks were measured with torch.utils.flop_counter on CPU; everything else is arithmetic on them.
The sustained rates are assumptions for eager PyTorch (no torch.compile, the grids' setting) on A100- to
H100-class GPUs: they bound a range, they are not a measurement. benchmarks/gpu_session.sh measures them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Encoder forward FLOPs per 32 x 32 image at width 1 (measured: FlopCounterMode, CIFAR ResNet18 stem / VGG11
# config A). Convolutions scale with width^2 and with the pixel count.
ENCODER_FLOP = {"resnet18": 1.111e9, "vgg11": 0.306e9, "flatten": 0.0}
EMBED_DIM = {"resnet18": 512, "vgg11": 512}
# (train images, test images, side in pixels) of the registered datasets.
DATASETS = {"cifar10": (50_000, 10_000, 32), "cifar100": (50_000, 10_000, 32), "stl10": (5_000, 8_000, 96),
            "tinyimagenet": (100_000, 10_000, 64), "digits": (5_000, 1_000, 32), "photos": (5_000, 1_000, 32)}
# Sustained rate (FLOP/s) of eager PyTorch on these small convolutions, (slow, fast) for the slowest and fastest
# GPU class assumed. fp32: convolutions in TF32 (cuDNN's default), launch- and memory-bound layers included;
# the low end is about an A100's plain fp32 peak (19.5 TFLOP/s) discounted for small kernels, the high end a
# quarter of an H100's TF32 peak. Half precision: the public A100 ResNet18 CIFAR rate (77 TFLOP/s, fp16,
# channels-last, about 25 % of peak) halved for eager, to twice it on an H100.
RATES = {"no": (15e12, 60e12), "bf16": (40e12, 150e12), "fp16": (40e12, 150e12)}
PROBE_STEP_S = (0.2e-3, 0.6e-3)  # one linear-probe step (a few small kernels): launch-bound, estimated
STARTUP_S = (20.0, 120.0)         # per command: CUDA init, reading the cached dataset, building the networks


@dataclass
class Cost:
    flop: float = 0.0        # training + feature extraction + k-NN
    probe_steps: int = 0     # linear-probe optimiser steps (launch-bound: counted in time, not FLOPs)
    commands: int = 0
    rates: tuple = RATES["no"]
    probe_flop: float = 0.0  # the probing share of `flop`

    def hours(self) -> tuple[float, float]:
        """(low, high) GPU-hours."""
        low = self.flop / self.rates[1] + self.probe_steps * PROBE_STEP_S[0] + self.commands * STARTUP_S[0]
        high = self.flop / self.rates[0] + self.probe_steps * PROBE_STEP_S[1] + self.commands * STARTUP_S[1]
        return low / 3600, high / 3600

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flop + other.flop, self.probe_steps + other.probe_steps, self.commands + other.commands,
                    self.rates, self.probe_flop + other.probe_flop)

    def __mul__(self, times: int) -> "Cost":
        return Cost(self.flop * times, self.probe_steps * times, self.commands * times, self.rates,
                    self.probe_flop * times)


def _dataset(name) -> tuple:
    return DATASETS.get(str(name).rstrip("/").split("/")[-1], DATASETS["cifar10"])


def network_flop(args: dict, side: int) -> tuple[float, float]:
    """(encoder, head) forward FLOPs per image of a point's network."""
    model, width = args.get("model", "resnet18"), args.get("width", 1.0)
    encoder = ENCODER_FLOP[model] * width ** 2 * (side / 32) ** 2
    embed = 3 * side * side if model == "flatten" else round(EMBED_DIM[model] * width)
    dims = [embed, *args.get("hidden_dims", [2048, 2048]), args.get("bottleneck_dim", 256), args.get("out_dim", 65536)]
    return encoder, sum(2 * a * b for a, b in zip(dims, dims[1:]))


def probe_cost(encoder: float, n_train: int, n_test: int, dim: int, args: dict) -> Cost:
    """One probe of one encoder: features of every image, the linear probe's steps, the k-NN search (both twice
    with --probe-standardized)."""
    variants = 2 if args.get("probe_standardized") else 1
    flop = (n_train + n_test) * encoder + variants * 2 * n_test * n_train * dim
    steps = variants * args.get("probe_epochs", 10) * math.ceil(n_train / 256)
    return Cost(flop, steps, probe_flop=flop)


def point_cost(args: dict, probe_on: tuple = ()) -> Cost:
    """Derived cost of one train_distill.py point (and its probe.py transfers)."""
    n_train, n_test, side = _dataset(args.get("dataset", "cifar10"))
    n_distill = min(n_train, args.get("train_subset") or n_train)
    encoder, head = network_flop(args, side)
    dim = 3 * side * side if args.get("model") == "flatten" else round(512 * args.get("width", 1.0))
    epochs = args.get("epochs", 150)
    last_layer = 2 * args.get("bottleneck_dim", 256) * args.get("out_dim", 65536)
    teacher_step = encoder + head if args.get("no_teacher_cache") else last_layer
    train = n_distill * (epochs * (3 * (encoder + head) + teacher_step) + (encoder + head))  # + the cache pass
    every = args.get("probe_every", 1)
    probed_epochs = len({e for e in range(1, epochs + 1) if every and e % every == 0} | {epochs})
    # the student before training and after each probed epoch, the teacher once, the pixels once
    probes = probe_cost(encoder, n_train, n_test, dim, args) * (probed_epochs + 2) + \
        probe_cost(0.0, n_train, n_test, 3 * side * side, args)
    total = Cost(train, commands=1) + probes
    for dataset in probe_on:  # probe.py: the student, its rebuilt teacher and the pixels on another dataset
        t_train, t_test, t_side = _dataset(dataset)
        t_encoder, _ = network_flop(args, t_side)
        total = total + probe_cost(t_encoder, t_train, t_test, dim, args) * 2 + \
            probe_cost(0.0, t_train, t_test, 3 * t_side * t_side, args) + Cost(commands=1)
    total.rates = RATES[args.get("mixed_precision") or "no"]
    return total


METHOD = ("derived, not measured: FLOPs (measured per network on CPU, scaled by width, image size and head) "
          "at {:.0f}-{:.0f} TFLOP/s sustained ({}), linear-probe steps at {:.1f}-{:.1f} ms, {:.0f}-{:.0f} s start-up "
          "per command")


def method_line(precision: str = "no") -> str:
    slow, fast = RATES[precision]
    kind = "fp32 eager, TF32 convolutions" if precision == "no" else f"{precision} autocast, eager"
    return METHOD.format(slow / 1e12, fast / 1e12, kind, PROBE_STEP_S[0] * 1e3, PROBE_STEP_S[1] * 1e3, *STARTUP_S)
