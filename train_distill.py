#!/usr/bin/env python
"""Random-teacher self-distillation with probing during training ("Random Teachers are Good Teachers", §4).

    accelerate launch train_distill.py --model resnet18                  # CIFAR-10, the paper's defaults
    python train_distill.py --dataset digits --epochs 2                  # offline, on the built-in digits

A frozen random teacher (eval mode, never updated) provides soft targets; a student initialised at locality
alpha from it is trained with AdamW to match them on un-augmented images. The teacher and the raw pixels are
probed once, the student before training and every --probe-every epochs (linear + k-NN on encoder features).
Writes config.json, metrics.csv, summary.json, probe_table.csv, probe_accuracy.png and student/ to the run folder.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils.checkpoint import PreemptionSignal, list_checkpoints, load_latest_checkpoint, save_checkpoint
from utils.cli import ArgumentParser, UsageError, add_data_args, add_probe_args, check_range, main_guard
from utils.data import (Normalizer, class_balanced_subset, epoch_batches, load_dataset, noise_inputs, rank_slice,
                        validation_split)
from utils.distill import DistillStep, TeacherTargets, make_optimizer
from utils.dynamics import BatchNormStats, step_diagnostics
from utils.hub import new_run_id, push_or_explain, write_model_card
from utils.losses import LOSSES, loss_diagnostics
from utils.models import ENCODERS, NORMS, make_teacher_student, parse_bottleneck
from utils.probing import extract_features, probe_features
from utils.results import (MetricLog, environment, format_table, plot_probes, probe_table, summarize,
                           write_json, write_table)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@")
    m = p.add_argument_group("networks (SPEC §1)")
    m.add_argument("--model", choices=ENCODERS, default="resnet18")
    m.add_argument("--norm", choices=NORMS, help="normalisation after every conv (default: batch for resnet18, "
                                                 "none for vgg11)")
    m.add_argument("--hidden-dims", type=int, nargs="*", default=[2048, 2048], help="head MLP widths")
    m.add_argument("--bottleneck-dim", type=int, default=256)
    m.add_argument("--out-dim", type=int, default=65536, help="head output dimension (Fig. 11: 2^5 ... 2^16)")
    m.add_argument("--width", type=float, default=1.0,
                   help="scale every conv layer's channels (and the embedding size) by this factor; 1 = the paper's "
                        "network, < 1 a CPU-scale proxy (the head keeps its paper widths)")
    m.add_argument("--bottleneck", default="default",
                   help="six-slot wn1/lin1/fn1/wn2/lin2/fn2 string or preset: default = -/lb/fn/wn/l/- (paper "
                        "text), official = -/lb/fn/-/l/- (what the official code ran: its wn was a no-op)")
    t = p.add_argument_group("teacher, student and objective (SPEC §2)")
    t.add_argument("--alpha", type=float, default=1e-10, help="locality of the student init, in [0, 1]")
    t.add_argument("--teacher-seed", type=int, default=0)
    t.add_argument("--student-seed", type=int, default=1, help="seed of the fresh init mixed in with weight alpha")
    t.add_argument("--loss", choices=LOSSES, default="ce")
    t.add_argument("--teacher-temp", type=float, default=1.0)
    t.add_argument("--student-temp", type=float, default=1.0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=150)
    o.add_argument("--batch-size", type=int, default=256, help="global batch size (split across processes)")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of weights with >= 2 dims")
    o.add_argument("--bias-weight-decay", type=float, default=0.0,
                   help="AdamW decay of biases and norm parameters (the official code silently used 0.01)")
    o.add_argument("--seed", type=int, default=0, help="data order, subsets, validation split and noise")
    d = p.add_argument_group("data (SPEC §4)")
    add_data_args(p, default_dataset="cifar10")
    d.add_argument("--train-subset", type=int, help="distil on a class-balanced subset of this many images")
    d.add_argument("--input-noise", action="store_true",
                   help="distil on a fixed set of N(0,1) images instead (probing still uses clean data)")
    d.add_argument("--val-size", type=int, default=0,
                   help="hold out this many training images; also report test accuracy at the best-val epoch")
    add_probe_args(p)
    p.add_argument("--probe-every", type=int, default=1, help="probe the student every N epochs (0: first/last)")
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="run folder (default: runs/distill-<dataset>-<model>-a<alpha>-s<seed>)")
    r.add_argument("--overwrite", action="store_true", help="rerun even if the run folder holds a finished run")
    r.add_argument("--log-every", type=int, default=25,
                   help="log train diagnostics (loss, KL, embedding norm, distance to the teacher, gradient and "
                        "Adam step norms) every N steps")
    r.add_argument("--log-dynamics", action="store_true",
                   help="also log per-layer gradient / Adam step / weight sizes, the share of each layer's step "
                        "damped by Adam's eps, and BatchNorm running vs batch statistics (dynamics/* metrics)")
    r.add_argument("--checkpoint-every", type=int, default=5,
                   help="save a resumable checkpoint every N epochs and at the end (0: only on SIGTERM/SIGUSR1)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    r.add_argument("--resume", action="store_true",
                   help="require resuming from a checkpoint (by default a run resumes when it finds one)")
    h = p.add_argument_group("Hugging Face Hub")
    h.add_argument("--push-to-hub", metavar="REPO", help="upload the student and the metric tables to this repo")
    h.add_argument("--hub-private", action="store_true", help="create the repo as private")
    h.add_argument("--push-only", metavar="RUN_DIR", help="only (re)try the upload of a finished run folder")
    s = p.add_argument_group("speed (opt-in options change numerics slightly)")
    s.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                   help="autocast for student and teacher (default: from the accelerate config)")
    s.add_argument("--channels-last", nargs="?", choices=("auto", "on", "off"), const="on", default="auto",
                   help="channels_last memory layout for the convolutions (fp32 stays fp32; only the summation order "
                        "of the conv kernels changes). auto: on for resnet18 (1.28x per step on 2 CPU threads), off "
                        "for vgg11 (0.96x); README 'Speed'")
    s.add_argument("--compile", action="store_true", help="torch.compile the student")
    s.add_argument("--no-teacher-cache", action="store_true",
                   help="run the whole teacher every step instead of caching its per-image bottleneck output")
    s.add_argument("--sync-bn", choices=("auto", "on", "off"), default="auto",
                   help="BN statistics over the global batch with several GPUs (auto: on for multi-GPU)")
    args = p.parse_args(argv)
    if args.push_only:
        return args
    args.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and args.model == "resnet18")
    check_range("--alpha", args.alpha, 0.0, 1.0)
    if not 0 < args.width <= 16:
        raise UsageError("--width", f"must be in (0, 16], got {args.width}")
    for flag in ("epochs", "batch_size", "out_dim", "bottleneck_dim", "probe_epochs", "knn_k", "log_every",
                 "checkpoint_every", "keep_checkpoints"):
        check_range("--" + flag.replace("_", "-"), getattr(args, flag), integer_min=0 if flag in
                    ("epochs", "log_every", "checkpoint_every") else 1)
    try:
        parse_bottleneck(args.bottleneck)
    except ValueError as err:
        raise UsageError("--bottleneck", str(err)) from None
    return args


# Arguments that may differ between an interrupted run and its resumption; every other one must match.
RESUMABLE_CHANGES = {"epochs", "output_dir", "overwrite", "resume", "push_to_hub", "hub_private", "push_only",
                     "checkpoint_every", "keep_checkpoints", "log_every", "log_dynamics", "probe_batch_size",
                     "data_cache"}


def push_only(args) -> int:
    run_dir = Path(args.push_only)
    if not (run_dir / "summary.json").exists():
        raise UsageError("--push-only", f"{run_dir} holds no finished run (no summary.json)")
    config = json.loads((run_dir / "config.json").read_text())
    repo = args.push_to_hub or config.get("push_to_hub")
    if not repo:
        raise UsageError("--push-to-hub", "name the repo to push to")
    return 0 if push_or_explain(run_dir, repo, config["run_id"], args.hub_private, "train_distill.py") else 1


def check_resumable(out: Path, args) -> dict | None:
    """The config of the interrupted run in `out`, if it may be resumed with these arguments."""
    if not list_checkpoints(out / "checkpoints"):
        if args.resume:
            raise UsageError("--resume", f"no checkpoint in {out / 'checkpoints'}")
        return None
    if not (out / "config.json").exists():
        raise UsageError("--output-dir", f"{out} has checkpoints but no config.json to check them against; "
                                         "pass --overwrite to start over")
    previous = json.loads((out / "config.json").read_text())
    changed = sorted(k for k, v in vars(args).items() if k not in RESUMABLE_CHANGES and previous.get(k) != v)
    if changed:
        raise UsageError("--" + changed[0].replace("_", "-"),
                         f"{out} holds an interrupted run made with different arguments "
                         f"({', '.join(changed)}); pass --overwrite to start over or use another --output-dir")
    return previous


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.push_only:
        return push_only(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    is_main, world, rank, device = (accelerator.is_main_process, accelerator.num_processes,
                                    accelerator.process_index, accelerator.device)
    name = Path(args.dataset).name
    out = Path(args.output_dir or f"runs/distill-{name}-{args.model}-a{args.alpha:g}-s{args.seed}")
    if (out / "summary.json").exists() and not args.overwrite:
        accelerator.print(f"{out} already holds a finished run (summary.json); pass --overwrite to rerun it")
        return 0
    if args.overwrite and is_main:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    previous = None if args.overwrite else check_resumable(out, args)
    set_seed(args.seed)

    # ---- data: uint8 tensors on the device; every batch is an index gather
    with accelerator.main_process_first():
        data = load_dataset(args.dataset, args.image_column, args.label_column, args.train_split,
                            args.test_split, args.revision, args.image_size, args.data_cache)
    train_idx, val_idx = validation_split(len(data.train), args.val_size, args.seed) if args.val_size else \
        (torch.arange(len(data.train)), None)
    probe_train = data.train.subset(train_idx).to(device)
    evals = {"test": data.test.to(device)} | ({"val": data.train.subset(val_idx).to(device)} if args.val_size else {})
    distill_idx = class_balanced_subset(probe_train.labels.cpu(), args.train_subset, args.seed) \
        if args.train_subset else None
    distill_images = probe_train.images[distill_idx.to(device)] if distill_idx is not None else probe_train.images
    normalize = Normalizer(data.mean, data.std, device, args.channels_last)
    n_train = len(distill_images)
    if args.input_noise:
        noise = noise_inputs(n_train, data.image_size, args.seed, device)
        inputs = lambda idx: noise[idx].contiguous(memory_format=normalize.memory_format)  # noqa: E731
    else:
        inputs = lambda idx: normalize(distill_images[idx])  # noqa: E731

    # ---- networks
    arch = dict(model=args.model, norm=args.norm, image_size=data.image_size, hidden_dims=args.hidden_dims,
                bottleneck_dim=args.bottleneck_dim, out_dim=args.out_dim, bottleneck=args.bottleneck, width=args.width)
    teacher, student = make_teacher_student(arch, args.teacher_seed, args.student_seed, args.alpha)
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    teacher.to(device, memory_format=memory_format)
    student.to(device, memory_format=memory_format)
    if world > 1 and (args.sync_bn == "on" or (args.sync_bn == "auto" and device.type == "cuda")):
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    optimizer = make_optimizer(student, args.lr, args.weight_decay, args.bias_weight_decay)
    if args.compile:
        student.compile()
    student, optimizer = accelerator.prepare(student, optimizer)
    raw_student = accelerator.unwrap_model(student)
    steps_per_epoch = len(epoch_batches(n_train, args.batch_size, args.seed, 1, world))

    # ---- resume: model, optimiser and RNG from the newest valid checkpoint; position and metrics from its
    # run state. The data order of an epoch depends only on (seed, epoch), so the run continues exactly.
    log = MetricLog(out / "metrics.csv")
    position = {"epoch": 1, "batch": 0, "step": 0, "epoch_loss": 0.0, "elapsed": 0.0}
    restored = load_latest_checkpoint(accelerator, out / "checkpoints") if previous else None
    if previous and restored is None and args.resume:
        raise UsageError("--resume", f"no checkpoint in {out / 'checkpoints'} could be loaded")
    if restored:
        position = {k: restored[k] for k in position}
        log.rows = restored["rows"]
        accelerator.print(f"resuming {out} from {restored['checkpoint']} (epoch {position['epoch']}, "
                          f"step {position['step']})")
    run_id = previous["run_id"] if restored else new_run_id(out.name)
    config = {**vars(args), "output_dir": str(out), "run_id": run_id, "world_size": world,
              "autocast": accelerator.mixed_precision, "dataset_meta": data.meta,  # derived keys never
              "num_classes": data.num_classes, "data_image_size": data.image_size,  # shadow an argument
              "mean": data.mean, "std": data.std,
              "train_images": n_train, "steps_per_epoch": steps_per_epoch,
              "teacher_cache": not args.no_teacher_cache, "architecture": raw_student.config(),
              "environment": environment()}
    if is_main:
        write_json(out / "config.json", config)

    def feats(fn, images):
        return extract_features(fn, len(images), lambda i: normalize(images[i]), args.probe_batch_size,
                                accelerator, accelerator.autocast)

    def probe(subject: str, encoder_fn, train_features=None) -> dict:
        train = (train_features if train_features is not None else feats(encoder_fn, probe_train.images),
                 probe_train.labels)
        sets = {k: (feats(encoder_fn, s.images), s.labels) for k, s in evals.items()}
        return probe_features(train, sets, data.num_classes, args, subject)

    def probe_student(epoch: int, step: int) -> None:
        raw_student.eval()
        log.log(epoch, step, probe("student", raw_student.encoder))
        raw_student.train()
        if is_main:
            log.flush()

    # ---- the teacher's bottleneck input is cached (exact here: no augmentation, an eval-mode teacher that
    # never changes), so each step runs only its last layer. The teacher and the pixels are probed once.
    started = time.time() - position["elapsed"]
    use_cache = not args.no_teacher_cache
    shared_pass = use_cache and distill_idx is None and not args.input_noise and not restored
    emb_dim = teacher.embed_dim
    teacher_train = feats(lambda x: torch.cat([e := teacher.encoder(x), teacher.head.trunk(e)], 1),
                          probe_train.images) if shared_pass else None  # one teacher pass serves both
    teacher_cache = None
    if use_cache:
        teacher_cache = teacher_train[:, emb_dim:] if shared_pass else extract_features(
            lambda x: teacher.head.trunk(teacher.encoder(x)), n_train, inputs, args.probe_batch_size,
            accelerator, accelerator.autocast)
    if not restored:
        results = probe("teacher", teacher.encoder, teacher_train[:, :emb_dim] if shared_pass else None)
        results |= probe("input", torch.nn.Flatten())
        log.log(0, 0, results)
        probe_student(0, 0)
    del teacher_train

    distill_step = DistillStep(student, optimizer, accelerator, inputs, TeacherTargets(teacher, inputs, teacher_cache),
                               args.loss, args.teacher_temp, args.student_temp)
    bn_stats = BatchNormStats(raw_student) if args.log_dynamics else None

    @torch.no_grad()
    def param_distance() -> float:
        sq = sum(((ps.float() - pt.float()) ** 2).sum() for ps, pt in zip(raw_student.parameters(),
                                                                         teacher.parameters()))
        return math.sqrt(float(sq))

    def checkpoint(epoch: int, batch: int, step: int, epoch_loss: float) -> None:
        state = {"epoch": epoch, "batch": batch, "step": step, "epoch_loss": epoch_loss, "rows": log.rows,
                 "elapsed": time.time() - started, "run_id": run_id}
        save_checkpoint(accelerator, out / "checkpoints", step, state, args.keep_checkpoints)

    # ---- training: AdamW on the batch-mean loss; the global batch is split across processes. SIGTERM or
    # SIGUSR1 (Slurm pre-emption / time limit) checkpoint at the next step boundary and stop.
    preempt = PreemptionSignal()
    total = args.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=position["step"], desc="distill", disable=not is_main, dynamic_ncols=True)
    try:
        step = position["step"]
        for epoch in range(position["epoch"], args.epochs + 1):
            student.train()
            batches = [b.to(device) for b in epoch_batches(n_train, args.batch_size, args.seed, epoch, world)]
            first = position["batch"] if epoch == position["epoch"] else 0
            epoch_loss = torch.tensor(position["epoch_loss"] if epoch == position["epoch"] else 0.0, device=device)
            for b in range(first, len(batches)):
                batch = batches[b]
                logging = bool(args.log_every) and ((step + 1) % args.log_every == 0 or b == len(batches) - 1)
                if bn_stats:
                    bn_stats.active = logging
                per_sample, s_logits, t_logits, embedding = distill_step(rank_slice(batch, rank, world), len(batch),
                                                                         record_grads=logging)
                epoch_loss += per_sample.sum()
                step += 1
                bar.update(1)
                if logging:
                    diag = loss_diagnostics(s_logits, t_logits, args.teacher_temp, args.student_temp)
                    diag["embedding_norm"] = embedding.float().norm(dim=1).sum()
                    sums = accelerator.reduce(torch.stack(list(diag.values())) / len(batch), reduction="sum")
                    values = {f"train/{k}": v for k, v in zip(diag, sums.tolist())}
                    values["train/param_distance"] = param_distance()
                    values |= step_diagnostics(raw_student, optimizer, distill_step.grad_sq, args.log_dynamics)
                    values |= bn_stats.read() if bn_stats else {}
                    log.log(epoch, step, values)
                    bar.set_postfix(ce=f"{values['train/ce']:.6g}", dist=f"{values['train/param_distance']:.3g}")
                stop = preempt.received is not None
                if world > 1:  # every process must agree; a tiny all-reduce every 10 steps
                    stop = step % 10 == 0 and bool(accelerator.reduce(torch.tensor(float(stop), device=device)) > 0)
                if stop:
                    checkpoint(epoch, b + 1, step, epoch_loss.item())
                    accelerator.print(f"\n{preempt.received or 'signal'} received: checkpoint saved in {out / 'checkpoints'}"
                                      f" at step {step}; rerun the same command to resume")
                    return 128 + getattr(signal, preempt.received or "SIGTERM")
            log.log(epoch, step, {"train/loss": accelerator.reduce(epoch_loss, reduction="sum").item()
                                           / sum(len(b) for b in batches)})
            if epoch == args.epochs or (args.probe_every and epoch % args.probe_every == 0):
                probe_student(epoch, step)
            if args.checkpoint_every and epoch % args.checkpoint_every == 0 and epoch < args.epochs:
                checkpoint(epoch + 1, 0, step, 0.0)
    finally:  # also on errors: an in-process caller gets its signal handlers back
        bar.close()
        preempt.restore()

    # ---- results (main process only)
    summary = summarize(log.frame())
    table = probe_table(summary)
    if is_main:
        log.flush()
        config |= {"steps": step, "wall_time_s": round(time.time() - started, 1)}
        write_json(out / "config.json", config)
        raw_student.save_pretrained(out / "student")
        write_model_card(out / "student", config, table)
        write_table(out / "probe_table.csv", table.reset_index())
        plot_probes(log.frame(), out / "probe_accuracy.png",
                    f"{args.model} on {name}, alpha={args.alpha:g}, {step} steps")
        write_json(out / "summary.json", {"probes": summary, "steps": step, "epochs": args.epochs,
                                          "run_id": run_id, "wall_time_s": config["wall_time_s"]})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: student/ and the tables hold it all
        print(f"\nProbe accuracy (%) after {step} steps, {config['wall_time_s']:.0f} s -> {out}")
        print(format_table(table))
    pushed = not (args.push_to_hub and is_main) or push_or_explain(out, args.push_to_hub, run_id, args.hub_private,
                                                                   "train_distill.py")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0 if pushed else 1


if __name__ == "__main__":
    sys.exit(main())
