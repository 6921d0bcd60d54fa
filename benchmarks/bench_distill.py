#!/usr/bin/env python
"""Benchmark (a): distillation steps/s of this project's training step vs a plain reference loop, in one run.

    python benchmarks/bench_distill.py                                  # resnet18, batch 64, 32x32, 1 thread
    python benchmarks/bench_distill.py --model vgg11 --threads 2
    python benchmarks/bench_distill.py --channels-last                  # opt-in speed flags: project side only
    python benchmarks/bench_distill.py --bf16 --channels-last --compile
    python benchmarks/bench_distill.py --breakdown                      # also time each phase of one step

Both sides train the same network (utils.models.DistillationNetwork: encoder + the paper's DINO head with its
65,536-way output, identical initial weights from make_teacher_student) on the same 32x32 digit canvases,
with the same batch size and the same number of steps.

project   the step train_distill.py runs: uint8 images resident on the device, normalised and gathered by index
          (utils.data.Normalizer, utils.data.epoch_order), the teacher's head-trunk output cached once
          (utils.distill.TeacherTargets; the cache build is timed separately and reported, not in steps/s),
          fused AdamW (utils.distill.make_optimizer), utils.distill.DistillStep under an accelerate.Accelerator
          (model and optimizer passed through accelerator.prepare, as in train_distill.py), the loss summed on
          the device (no host synchronisation per step). --channels-last / --bf16 / --compile apply here only.
reference a plain loop written below: a torch DataLoader (shuffle, drop_last, num_workers=--ref-workers,
          default 0: on 2 shared cores worker processes only compete with the compute) over a Dataset of PIL
          images with torchvision ToTensor + Normalize, the teacher's FULL forward every step under no_grad,
          soft-target cross-entropy, default torch.optim.AdamW (lr 1e-3, weight decay 0 as in the paper;
          foreach/fused left to torch, which on CPU picks the per-tensor for-loop), and loss.item() every step
          as a naive logging loop does. Always fp32, contiguous, eager.

Timing: both sides are warmed up (--warmup steps each; compile time is reported separately), then timed
interleaved A B A B ... for --repeats rounds of --steps steps each; the table reports median steps/s (min-max
over rounds) per side and the ratio of medians. On a shared CPU check /proc/loadavg first (printed).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import PILImages, load_avg, sync  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet18", "vgg11"), default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round and side")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per side (interleaved A B A B ...)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    p.add_argument("--n-images", type=int, default=512, help="size of the training set both sides cycle over")
    p.add_argument("--out-dim", type=int, default=65536, help="head output dimension (paper: 65536)")
    p.add_argument("--alpha", type=float, default=1e-10)
    p.add_argument("--ref-workers", type=int, default=0, help="DataLoader workers of the reference")
    p.add_argument("--channels-last", action="store_true", help="project side: channels_last model and inputs")
    p.add_argument("--bf16", action="store_true", help="project side: bf16 autocast (student and teacher)")
    p.add_argument("--compile", action="store_true", help="project side: student.compile() (torch.compile)")
    p.add_argument("--no-teacher-cache", action="store_true", help="project side: run the whole teacher per step")
    p.add_argument("--breakdown", action="store_true", help="also time each phase of a step on both sides")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- the reference
def soft_cross_entropy(student_logits, teacher_logits):
    return torch.sum(-F.softmax(teacher_logits, dim=-1) * F.log_softmax(student_logits, dim=-1), dim=-1).mean()


class Reference:
    """A plain distillation loop, one `run(n)` call = n steps."""

    def __init__(self, teacher, student, images, labels, mean, std, batch_size, workers, device):
        from torchvision import transforms

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.loader = torch.utils.data.DataLoader(PILImages(images, labels, transform), batch_size=batch_size,
                                                  shuffle=True, drop_last=True, num_workers=workers,
                                                  persistent_workers=workers > 0)
        self.teacher, self.student, self.device = teacher.to(device), student.to(device), device
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
        self.iterator = iter(self.loader)
        self.losses = []

    def next_batch(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def run(self, n):
        self.student.train()
        for _ in range(n):
            x, _ = self.next_batch()
            x = x.to(self.device)
            with torch.no_grad():
                t = self.teacher(x)
            s = self.student(x)
            loss = soft_cross_entropy(s, t)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.losses.append(loss.item())

    def breakdown_step(self, t: dict):
        """One step of run(), each phase timed on its own and added to `t` (seconds)."""
        t0 = time.perf_counter()
        x, _ = self.next_batch()
        x = x.to(self.device)
        sync(self.device); t1 = time.perf_counter()  # noqa: E702
        with torch.no_grad():
            tl = self.teacher(x)
        sync(self.device); t2 = time.perf_counter()  # noqa: E702
        loss = soft_cross_entropy(self.student(x), tl)
        sync(self.device); t3 = time.perf_counter()  # noqa: E702
        self.optimizer.zero_grad()
        loss.backward()
        sync(self.device); t4 = time.perf_counter()  # noqa: E702
        self.optimizer.step()
        sync(self.device); t5 = time.perf_counter()  # noqa: E702
        self.losses.append(loss.item())
        t6 = time.perf_counter()
        for k, a, b in zip(t, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
            t[k] += b - a


# -------------------------------------------------------------------------------------------- the project
class Project:
    """train_distill.py's step: device-resident uint8 data, cached teacher, fused AdamW, DistillStep."""

    def __init__(self, teacher, student, images, mean, std, batch_size, args, device):
        from accelerate import Accelerator

        from utils.data import Normalizer, epoch_order
        from utils.distill import DistillStep, TeacherTargets, make_optimizer
        from utils.probing import extract_features

        self.accelerator = accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no",
                                                     cpu=device.type == "cpu")
        self.device, self.batch_size, self.epoch_order = device, batch_size, epoch_order
        memory_format = torch.channels_last if args.channels_last else torch.preserve_format
        teacher.to(device, memory_format=memory_format)
        student.to(device, memory_format=memory_format)
        self.images = images.to(device)
        normalize = Normalizer(mean, std, device, args.channels_last)
        self.inputs = inputs = lambda idx: normalize(self.images[idx])  # noqa: E731
        optimizer = make_optimizer(student)
        if args.compile:
            student.compile()
        student, optimizer = accelerator.prepare(student, optimizer)
        self.student, self.optimizer, self.teacher = student, optimizer, teacher
        self.cache_seconds = 0.0
        cache = None
        if not args.no_teacher_cache:
            sync(device)
            t0 = time.perf_counter()
            cache = extract_features(lambda x: teacher.head.trunk(teacher.encoder(x)), len(images), inputs, 512,
                                     accelerator, accelerator.autocast)
            sync(device)
            self.cache_seconds = time.perf_counter() - t0
        self.targets = TeacherTargets(teacher, inputs, cache)
        self.step = DistillStep(student, optimizer, accelerator, inputs, self.targets)
        self.epoch, self.batches, self.epoch_loss = 0, [], torch.zeros((), device=device)

    def next_index(self):
        if not self.batches:
            self.epoch += 1
            order = self.epoch_order(len(self.images), 0, self.epoch).to(self.device)
            self.batches = list(order.split(self.batch_size))
            if len(self.batches[-1]) < self.batch_size:  # same batch size every step, as the reference
                self.batches.pop()
        return self.batches.pop(0)

    def run(self, n):
        self.student.train()
        for _ in range(n):
            idx = self.next_index()
            per_sample, *_ = self.step(idx, len(idx))
            self.epoch_loss += per_sample.sum()  # as train_distill.py: accumulated on the device

    def breakdown_step(self, t: dict):
        """One DistillStep, its phases (same operations) timed one by one and added to `t` (seconds)."""
        from utils.losses import distill_loss

        acc = self.accelerator
        t0 = time.perf_counter()
        idx = self.next_index()
        x = self.inputs(idx)
        sync(self.device); t1 = time.perf_counter()  # noqa: E702
        with acc.autocast():
            tl = self.targets(idx)
        sync(self.device); t2 = time.perf_counter()  # noqa: E702
        with acc.autocast():
            s, _ = self.student(x, return_embedding=True)
        per_sample = distill_loss(s, tl)
        sync(self.device); t3 = time.perf_counter()  # noqa: E702
        acc.backward(per_sample.sum() / len(idx))
        sync(self.device); t4 = time.perf_counter()  # noqa: E702
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device); t5 = time.perf_counter()  # noqa: E702
        self.epoch_loss += per_sample.detach().sum()
        t6 = time.perf_counter()
        for k, a, b in zip(t, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
            t[k] += b - a


# ------------------------------------------------------------------------------------------------- driver
def timed(side, n, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    side.run(n)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from utils.data import build_digits
    from utils.models import make_teacher_student

    train, _ = build_digits(n_train=args.n_images, n_test=1)
    pixels = train.images.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1, unbiased=False).tolist())
    arch = dict(model=args.model, image_size=32, out_dim=args.out_dim)
    teacher, student = make_teacher_student(arch, 0, 1, args.alpha)
    params = sum(p.numel() for p in student.parameters())

    flags = [f for f in ("channels_last", "bf16", "compile") if getattr(args, f)] or ["exact only"]
    if args.no_teacher_cache:
        flags.append("no teacher cache")
    print(f"bench_distill: {args.model} + DINO head (out {args.out_dim}), {params / 1e6:.2f} M student params, "
          f"batch {args.batch_size}, 32x32, {args.steps} steps x {args.repeats} rounds per side, "
          f"warmup {args.warmup}, device {device}, torch threads {args.threads}, "
          f"reference DataLoader workers {args.ref_workers}, project flags: {', '.join(flags)}")
    print(f"torch {torch.__version__}, load average before: {load_avg()}")

    ref = Reference(copy.deepcopy(teacher), copy.deepcopy(student), train.images, train.labels, mean, std,
                    args.batch_size, args.ref_workers, device)
    ref_opt = ref.optimizer.defaults
    print(f"reference AdamW: foreach={ref_opt['foreach']} fused={ref_opt['fused']} (None = torch's default: "
          f"{'for-loop per tensor' if device.type == 'cpu' else 'foreach'} on {device.type})")
    proj = Project(teacher, student, train.images, mean, std, args.batch_size, args, device)
    print(f"project: AdamW fused={proj.optimizer.optimizer.defaults['fused']}, "
          f"mixed precision={proj.accelerator.mixed_precision}, teacher cache "
          f"{'off' if args.no_teacher_cache else f'built in {proj.cache_seconds:.2f} s for {args.n_images} images'}")

    t0 = time.perf_counter()
    proj.run(args.warmup)
    warm_proj = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref.run(args.warmup)
    warm_ref = time.perf_counter() - t0
    print(f"warmup ({args.warmup} steps): reference {warm_ref:.1f} s, project {warm_proj:.1f} s"
          + (" (includes torch.compile)" if args.compile else ""))

    times = {"reference": [], "project": []}
    for r in range(args.repeats):
        for name, side in (("reference", ref), ("project", proj)) if r % 2 == 0 else \
                (("project", proj), ("reference", ref)):
            times[name].append(timed(side, args.steps, device))
    rates = {k: [args.steps / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}

    print(f"\n{'side':<11}{'median steps/s':>16}{'img/s':>10}{'s/step':>9}{'min-max steps/s':>20}")
    for k in ("reference", "project"):
        print(f"{k:<11}{med[k]:>16.3f}{med[k] * args.batch_size:>10.1f}{1 / med[k]:>9.3f}"
              f"{f'{min(rates[k]):.3f}-{max(rates[k]):.3f}':>20}")
    ratio = med["project"] / med["reference"]
    print(f"\nratio project / reference: {ratio:.2f}x   (load average after: {load_avg()})")
    if proj.cache_seconds:
        # the cache costs one teacher pass per training image per run (in train_distill.py it is shared with the
        # teacher's probe pass): report it as steps of the project's own rate and per epoch over a 150-epoch run
        steps_per_epoch = args.n_images / args.batch_size
        equiv = proj.cache_seconds * med["project"]
        print(f"teacher cache build: {proj.cache_seconds:.2f} s once ({equiv / steps_per_epoch:.2f} project epochs "
              f"of {args.n_images} images; amortised over a 150-epoch run: "
              f"{100 * equiv / steps_per_epoch / 150:.2f}% of training time)")
    ref_losses = ref.losses
    print(f"sanity: reference loss first/last {ref_losses[0]:.4f}/{ref_losses[-1]:.4f}; project mean loss "
          f"{proj.epoch_loss.item() / (args.batch_size * (args.warmup + args.steps * args.repeats)):.4f}")

    if args.breakdown:
        n = max(args.steps, 2)
        print(f"\nper-phase breakdown (mean seconds per step over {n} steps, each phase synchronised):")
        phases = ("data", "teacher", "student fwd + loss", "backward", "optimizer", "item")
        parts = {"reference": dict.fromkeys(phases, 0.0), "project": dict.fromkeys(phases, 0.0)}
        for _ in range(n):  # interleaved step by step
            ref.breakdown_step(parts["reference"])
            proj.breakdown_step(parts["project"])
        print(f"{'phase':<20}{'reference':>11}{'project':>11}")
        for k in parts["reference"]:
            print(f"{k:<20}{parts['reference'][k] / n:>11.4f}{parts['project'][k] / n:>11.4f}")
        print(f"{'total':<20}{sum(parts['reference'].values()) / n:>11.4f}"
              f"{sum(parts['project'].values()) / n:>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
