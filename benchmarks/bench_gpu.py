#!/usr/bin/env python
"""Benchmark (c): images/s and achieved TFLOP/s of the project's distillation step on a GPU.

    python benchmarks/bench_gpu.py                              # resnet18 and vgg11, batch 256
    python benchmarks/bench_gpu.py --compile --peak-tflops 989  # also the torch.compile configurations

For each model (--models) it times the exact training step of train_distill.py (benchmarks/bench_distill.py's
`Project`: device-resident uint8 data, cached teacher, fused AdamW, DistillStep under accelerate) at batch 256
in these configurations: exact (fp32; torch's default TF32 settings are printed), bf16 autocast (teacher
included), bf16 + channels_last, and with --compile also bf16 + channels_last + torch.compile. Each
configuration runs in its own subprocess (accelerate's mixed-precision state is per process, and compile
caches stay separate).

Achieved TFLOP/s = FLOPs of one step, counted with torch.utils.flop_counter.FlopCounterMode on an eager step
(matmul/conv FLOPs only; the count does not depend on dtype or layout), x steps/s. %peak divides by
--peak-tflops (default 989: H100 SXM dense bf16; use ~495 for dense TF32, 67 for FP32 non-tensor-core).

Without a CUDA device it prints that no GPU is present and exits 0: CPU numbers are not GPU numbers.
(--allow-cpu runs the same code on the CPU as a smoke test of the script; it prints no %peak.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

CONFIGS = {  # name -> (bf16, channels_last, compile)
    "exact fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16 + channels_last": (True, True, False),
    "bf16 + channels_last + compile": (True, True, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("resnet18", "vgg11"), default=["resnet18", "vgg11"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (compile happens here)")
    p.add_argument("--n-images", type=int, default=4096, help="training images the step cycles over")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for %%peak (H100 SXM dense bf16)")
    p.add_argument("--compile", action="store_true", help="also run bf16 + channels_last + torch.compile")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script on the CPU (no %%peak)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON of one configuration
    return p.parse_args(argv)


def worker(spec: dict) -> dict:
    """Measure one (model, configuration) in this process; return a JSON-able dict."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench_distill import Project
    from utils.data import build_digits
    from utils.models import make_teacher_student

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train, _ = build_digits(n_train=spec["n_images"], n_test=1)
    pixels = train.images.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1, unbiased=False).tolist())
    arch = dict(model=spec["model"], image_size=32)
    opts = argparse.Namespace(bf16=spec["bf16"], channels_last=spec["channels_last"], compile=False,
                              no_teacher_cache=False)

    # FLOPs of one step, on an eager instance (identical FLOPs to the measured one)
    teacher, student = make_teacher_student(arch, 0, 1, 1e-10)
    counted = Project(teacher, student, train.images, mean, std, spec["batch_size"], opts, device)
    with FlopCounterMode(display=False) as counter:
        counted.run(1)
    flops = counter.get_total_flops()
    del counted, teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    opts.compile = spec["compile"]
    teacher, student = make_teacher_student(arch, 0, 1, 1e-10)
    project = Project(teacher, student, train.images, mean, std, spec["batch_size"], opts, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    project.run(spec["warmup"])
    sync()
    warmup_s = time.perf_counter() - t0
    rates = []
    for _ in range(spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        project.run(spec["steps"])
        sync()
        rates.append(spec["steps"] / (time.perf_counter() - t0))
    steps_s = statistics.median(rates)
    return {"steps_s": steps_s, "min": min(rates), "max": max(rates), "flops": flops, "warmup_s": warmup_s,
            "cache_s": project.cache_seconds,
            "memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "loss_finite": bool(torch.isfinite(project.epoch_loss).item())}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench_gpu: no GPU present (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a CUDA machine; on CPU use benchmarks/bench_distill.py.")
        return 0
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        name = torch.cuda.get_device_name()
        print(f"bench_gpu: {name}, torch {torch.__version__}, batch {args.batch_size}, {args.steps} steps x "
              f"{args.repeats} rounds after {args.warmup} warmup steps; peak {args.peak_tflops} TFLOP/s; "
              f"TF32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}")
    else:
        print(f"bench_gpu: CPU SMOKE RUN (--allow-cpu): not a GPU measurement, no %peak; torch {torch.__version__}")
    configs = {k: v for k, v in CONFIGS.items() if args.compile or not v[2]}
    header = f"{'model':<10}{'configuration':<32}{'steps/s':>9}{'img/s':>10}{'GFLOP/step':>12}{'TFLOP/s':>9}" \
             f"{'%peak':>7}{'warmup s':>10}{'GPU GiB':>9}"
    rows = []
    for model in args.models:
        for cname, (bf16, cl, comp) in configs.items():
            spec = dict(model=model, bf16=bf16, channels_last=cl, compile=comp, batch_size=args.batch_size,
                        steps=args.steps, repeats=args.repeats, warmup=args.warmup, n_images=args.n_images)
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"{model} / {cname}: FAILED (exit {proc.returncode}): {' | '.join(tail)}")
                continue
            r = json.loads(lines[-1][7:])
            tflops = r["flops"] * r["steps_s"] / 1e12
            peak = f"{100 * tflops / args.peak_tflops:.1f}" if on_gpu else "n/a"
            mem = f"{r['memory_gib']:.1f}" if r["memory_gib"] is not None else "n/a"
            rows.append(f"{model:<10}{cname:<32}{r['steps_s']:>9.2f}{r['steps_s'] * args.batch_size:>10.0f}"
                        f"{r['flops'] / 1e9:>12.1f}{tflops:>9.2f}{peak:>7}{r['warmup_s']:>10.1f}{mem:>9}")
            print(rows[-1], flush=True)
    print("\n" + header)
    print("\n".join(rows))
    print("FLOPs: matmul/conv only, one step with the teacher cache (teacher runs only its 256->65536 layer). "
          "%peak is against --peak-tflops for every row, also the fp32 one (whose own ceiling is TF32 / FP32).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
