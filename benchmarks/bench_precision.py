#!/usr/bin/env python
"""Seconds per distillation step of train_distill.py's own step for each model x precision x memory layout.

    python benchmarks/bench_precision.py                         # resnet18 + vgg11, batch 256, 2 threads
    python benchmarks/bench_precision.py --models vgg11 --batch-size 64 --width 0.25

Every configuration runs the same utils.distill.DistillStep (teacher cache on, fused AdamW), under the
autocast that train_distill.py's --mixed-precision no / bf16 gives on a CPU (torch.autocast("cpu",
bfloat16); one process can hold only one accelerate state, hence the small stand-in below), on contiguous
or channels_last tensors, from the same initial weights. Timing: --warmup untimed steps, then --repeats
rounds of --steps steps per configuration, interleaved round-robin so machine noise spreads over all of them; the table gives the median s/step and the
speed ratio against fp32 contiguous of the same model. Which path is fastest depends on the CPU (AMX-bf16 or
not) and on the thread count, so measure on the machine that will run the experiments.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import load_avg, sync  # noqa: E402

from utils.data import build_digits, Normalizer  # noqa: E402
from utils.distill import DistillStep, TeacherTargets, make_optimizer  # noqa: E402
from utils.models import make_teacher_student  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("resnet18", "vgg11"), default=["resnet18", "vgg11"])
    p.add_argument("--precisions", nargs="+", choices=("no", "bf16"), default=["no", "bf16"])
    p.add_argument("--layouts", nargs="+", choices=("contiguous", "channels_last"),
                   default=["contiguous", "channels_last"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0, help="encoder channel multiplier (train_distill.py --width)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    for flag in ("batch_size", "threads", "steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"argument --{flag.replace('_', '-')}: must be >= 1")
    if not 0 < args.width <= 16:
        p.error("argument --width: must be in (0, 16]")
    return args


class CPUAutocast:
    """What DistillStep uses of an Accelerator on one CPU process: autocast, backward, num_processes."""
    num_processes = 1

    def __init__(self, precision: str):
        self.enabled, self.device = precision == "bf16", torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled)

    def backward(self, loss):
        loss.backward()


def make_config(model, precision, layout, args, images):
    accelerator = CPUAutocast(precision)
    memory_format = torch.channels_last if layout == "channels_last" else torch.preserve_format
    teacher, student = make_teacher_student(dict(model=model, width=args.width), 0, 1, 1e-10)
    teacher.to(memory_format=memory_format)
    student.to(memory_format=memory_format)
    optimizer = make_optimizer(student)
    normalize = Normalizer((0.5,) * 3, (0.25,) * 3, accelerator.device, layout == "channels_last")
    inputs = lambda idx: normalize(images[idx])  # noqa: E731
    with torch.no_grad(), accelerator.autocast():
        cache = teacher.head.trunk(teacher.encoder(inputs(torch.arange(len(images))))).float()
    step = DistillStep(student, optimizer, accelerator, inputs, TeacherTargets(teacher, inputs, cache))
    batches = itertools.cycle(torch.arange(len(images)).split(args.batch_size))
    return lambda: step(next(batches), args.batch_size)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = build_digits(n_train=2 * args.batch_size, n_test=1)[0].images
    names = [(m, p, lay) for m in args.models for p in args.precisions for lay in args.layouts]
    steps = {name: make_config(*name, args, images) for name in names}
    for name, run in steps.items():
        for _ in range(args.warmup):
            run()
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            sync(torch.device("cpu"))
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"batch {args.batch_size}, width {args.width:g}, {args.threads} threads, torch {torch.__version__}, "
          f"load {load_avg()}; median over {args.repeats} rounds of {args.steps} steps")
    print("| model | precision | layout | s/step | speed vs fp32 contiguous |\n|---|---|---|---|---|")
    for m, p, lay in names:
        med = statistics.median(times[(m, p, lay)])
        base = statistics.median(times.get((m, "no", "contiguous"), times[(m, p, lay)]))
        print(f"| {m} | {'fp32' if p == 'no' else p} | {lay} | {med:.3f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
