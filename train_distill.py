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

import sys
from pathlib import Path

from utils.choices import ENCODERS, LOSSES, NORMS, parse_bottleneck, uses_channels_last
from utils.cli import (REPETITION_RULE, ArgumentParser, UsageError, add_data_args, add_probe_args, add_report_args,
                       apply_repetition, check_image_size, check_output_dir, count, fraction, main_guard, non_negative,
                       positive)


def parse_args(argv=None):
    """Parse and check every flag (torch-free, so a bad flag is reported before torch is imported)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@",
                       epilog="Exit status: 0 done (or already done), 1 the Hub push failed (rerun with --push-only), "
                              "2 bad input (nothing changed on disk), 3 the run diverged, 128+N stopped by signal N "
                              "after a checkpoint (rerun the same command to resume).")
    m = p.add_argument_group("networks")
    m.add_argument("--model", choices=ENCODERS, default="resnet18",
                   help="encoder of teacher and student; flatten: no encoder (the head on raw pixels)")
    m.add_argument("--norm", choices=NORMS, help="normalisation after every conv (default: batch for resnet18, "
                                                 "none for vgg11)")
    m.add_argument("--width", type=positive, default=1.0,
                   help="scale every conv layer's channels (and the embedding size) by this factor, at most 16; 1 = "
                        "the paper's network, < 1 a CPU-scale proxy (the head keeps its widths)")
    m.add_argument("--hidden-dims", type=count(1), nargs="*", default=[2048, 2048],
                   help="widths of the head's hidden MLP layers (none: a linear head)")
    m.add_argument("--bottleneck-dim", type=count(1), default=256, help="width of the head's L2 bottleneck")
    m.add_argument("--out-dim", type=count(1), default=65536,
                   help="head output dimension: the number of soft classes (Fig. 11 sweeps 2^5 ... 2^16)")
    m.add_argument("--bottleneck", default="default",
                   help="six-slot wn1/lin1/fn1/wn2/lin2/fn2 string or a preset: default = -/lb/fn/wn/l/- (the "
                        "paper's text), official = -/lb/fn/-/l/- (what the official code ran: its wn was a no-op)")
    t = p.add_argument_group("teacher, student and objective")
    t.add_argument("--alpha", type=fraction, default=1e-10,
                   help="locality of the student's init, in [0, 1]: student = (1 - alpha) teacher + alpha fresh init")
    t.add_argument("--repeat", type=count(0), default=0, metavar="R",
                   help=f"repetition index R: draws every random choice anew ({REPETITION_RULE}); a seed flag "
                        "given explicitly overrides its derived value. config.json records the effective seeds. "
                        "R = 0 gives teacher 0, student 1, data 0, probe 0")
    t.add_argument("--teacher-seed", type=count(0), help="seed of the random teacher's init (default: 2R)")
    t.add_argument("--student-seed", type=count(0),
                   help="seed of the fresh init mixed into the student with weight alpha (default: 2R + 1)")
    t.add_argument("--loss", choices=LOSSES, default="ce",
                   help="ce: cross-entropy to the teacher's softmax (the paper's); kl: its KL form (same gradient); "
                        "mse: squared error of the raw outputs")
    t.add_argument("--teacher-temp", type=positive, default=1.0, help="softmax temperature of the teacher's targets")
    t.add_argument("--student-temp", type=positive, default=1.0, help="softmax temperature of the student's outputs")
    o = p.add_argument_group("optimisation (AdamW)")
    o.add_argument("--epochs", type=count(1), default=150, help="passes over the training images")
    o.add_argument("--batch-size", type=count(1), default=256, help="global batch size (split across processes)")
    o.add_argument("--lr", type=positive, default=1e-3, help="AdamW learning rate (constant)")
    o.add_argument("--weight-decay", type=non_negative, default=0.0, help="AdamW decay of weights with >= 2 dims")
    o.add_argument("--bias-weight-decay", type=non_negative, default=0.0,
                   help="AdamW decay of biases and norm parameters (the official code silently used 0.01)")
    o.add_argument("--seed", type=count(0), help="seed of the data order, subsets, validation split and noise "
                                                 "inputs (default: R)")
    d = add_data_args(p, default_dataset="cifar10")
    d.add_argument("--train-subset", type=count(1), help="distil on a class-balanced subset of this many images "
                                                         "(default: all; probes always use all)")
    d.add_argument("--input-noise", action="store_true",
                   help="distil on a fixed set of N(0,1) images instead (probing still uses clean data)")
    d.add_argument("--val-size", type=count(0), default=0,
                   help="hold out this many training images; also report test accuracy at the best-val epoch")
    g = add_probe_args(p, repeated=True)
    g.add_argument("--probe-every", type=count(0), default=1,
                   help="probe the student every N epochs (0: only before training and at the end)")
    r = p.add_argument_group("run folder, logging and checkpoints")
    r.add_argument("--output-dir", help="run folder (default: runs/distill-<dataset>-<model>-a<alpha>-s<seed>)")
    r.add_argument("--overwrite", action="store_true",
                   help="discard the folder's finished run, or its interrupted run of other arguments, and start "
                        "over; an interrupted run of these same arguments is resumed even so (exactly the result "
                        "of starting over), so a requeued job never restarts from zero")
    r.add_argument("--log-every", type=count(0), default=25,
                   help="log train diagnostics (loss, KL, embedding norm, distance to the teacher, gradient and "
                        "Adam step norms) every N steps (0: never)")
    r.add_argument("--log-dynamics", action="store_true",
                   help="also log per-layer gradient / Adam step / weight sizes, the share of each layer's step "
                        "damped by Adam's eps, and BatchNorm running vs batch statistics (dynamics/* metrics)")
    r.add_argument("--checkpoint-every", type=count(0), default=5,
                   help="save a resumable checkpoint every N epochs (0: only when stopped by SIGTERM/SIGUSR1); "
                        "checkpoints are deleted once the run has finished")
    r.add_argument("--keep-checkpoints", type=count(1), default=2, help="how many of the newest checkpoints to keep")
    r.add_argument("--resume", action="store_true",
                   help="fail unless the run resumes from a checkpoint (by default a run resumes when it finds one)")
    add_report_args(r)
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
    apply_repetition(args)  # from here on args holds the effective seeds, however they were derived
    args.channels_last = uses_channels_last(args.channels_last, args.model)
    if args.width > 16:
        raise UsageError("--width", f"must be in (0, 16], got {args.width:g}")
    try:
        parse_bottleneck(args.bottleneck)
    except ValueError as err:
        raise UsageError("--bottleneck", str(err)) from None
    check_image_size(args.dataset, args.image_size, args.model)
    name = Path(args.dataset).name
    args.output_dir = str(check_output_dir("--output-dir", Path(
        args.output_dir or f"runs/distill-{name}-{args.model}-a{args.alpha:g}-s{args.seed}")))
    return args


if __name__ == "__main__":  # torch takes seconds to import: report a bad flag before that
    main_guard(parse_args)()

# ruff: noqa: E402  (the heavy imports below follow the flag check on purpose)
import json
import math
import shlex
import signal
import time
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils.checkpoint import PreemptionSignal, list_checkpoints, load_latest_checkpoint, save_checkpoint
from utils.cli import RunFailed, check_knn_k
from utils.data import (Normalizer, class_balanced_subset, epoch_batches, load_dataset, noise_inputs, rank_slice,
                        validation_split)
from utils.distill import DistillStep, TeacherTargets, make_optimizer
from utils.dynamics import BatchNormStats, step_diagnostics
from utils.hub import new_run_id, push_or_explain, write_model_card
from utils.losses import loss_diagnostics
from utils.models import make_teacher_student
from utils.probing import extract_features, probe_features
from utils.results import (MetricLog, discard_run, environment, format_table, plot_probes, probe_line, probe_table,
                           read_config, summarize, write_json, write_table)
from utils.tracking import open_tracker


# Arguments that may differ between an interrupted run and its resumption; every other one must match. `repeat`
# only derives seeds: the effective seeds it gave are compared instead, so `--repeat 1` and `--repeat 1
# --teacher-seed 2` are one run, and folders made before --repeat existed (no `repeat` key) still match.
RESUMABLE_CHANGES = {"epochs", "output_dir", "overwrite", "resume", "push_to_hub", "hub_private", "push_only",
                     "checkpoint_every", "keep_checkpoints", "log_every", "log_dynamics", "probe_batch_size",
                     "data_cache", "repeat", "report_to", "tracker_project"}


def push_only(args) -> int:
    run_dir = Path(args.push_only)
    if not (run_dir / "summary.json").exists():
        raise UsageError("--push-only", f"{run_dir} holds no finished run (no summary.json)")
    config = json.loads((run_dir / "config.json").read_text())
    repo = args.push_to_hub or config.get("push_to_hub")
    if not repo:
        raise UsageError("--push-to-hub", "name the repo to push to")
    return 0 if push_or_explain(run_dir, repo, config["run_id"], args.hub_private, "train_distill.py") else 1


def changed_arguments(previous: dict, args) -> list[str]:
    return sorted(k for k, v in vars(args).items() if k not in RESUMABLE_CHANGES and previous.get(k) != v)


def resumable_config(out: Path, args) -> dict | None:
    """The config of an interrupted run of these same arguments in `out`, which is then resumed; None to start
    over. An interrupted run is resumed even with --overwrite: resuming is exact, so it ends where starting over
    would, and a requeued `--overwrite` job must continue, not restart forever. Checks only; changes nothing."""
    if not list_checkpoints(out / "checkpoints"):
        if args.resume:
            raise UsageError("--resume", f"no checkpoint in {out / 'checkpoints'}")
        return None
    previous = read_config(out)
    if previous is None:
        if args.overwrite:
            return None
        raise UsageError("--output-dir", f"{out} has checkpoints but no readable config.json to check them "
                                         "against; pass --overwrite to start over")
    changed = changed_arguments(previous, args)
    if changed and args.overwrite and not args.resume:
        return None
    if changed:
        raise UsageError("--" + changed[0].replace("_", "-"),
                         f"{out} holds an interrupted run made with different arguments "
                         f"({', '.join(changed)}); pass --overwrite to start over or use another --output-dir")
    return previous


def load_distill_data(args, accelerator) -> SimpleNamespace:
    """uint8 tensors on the device (every batch is an index gather), the probe sets and the distillation inputs."""
    device = accelerator.device
    with accelerator.main_process_first():
        data = load_dataset(args.dataset, args.image_column, args.label_column, args.train_split,
                            args.test_split, args.revision, args.image_size, args.data_cache)
    check_image_size(args.dataset, data.image_size, args.model, loaded=True)
    train_idx, val_idx = validation_split(len(data.train), args.val_size, args.seed) if args.val_size else \
        (torch.arange(len(data.train)), None)
    probe_train = data.train.subset(train_idx).to(device)
    check_knn_k(args.knn_k, len(probe_train), "--val-size")
    evals = {"test": data.test.to(device)} | ({"val": data.train.subset(val_idx).to(device)} if args.val_size else {})
    distill_idx = class_balanced_subset(probe_train.labels.cpu(), args.train_subset, args.seed) \
        if args.train_subset else None
    distill_images = probe_train.images[distill_idx.to(device)] if distill_idx is not None else probe_train.images
    normalize = Normalizer(data.mean, data.std, device, args.channels_last)
    n_train = len(distill_images)
    if n_train < 2 * accelerator.num_processes or args.batch_size < 2 * accelerator.num_processes:
        raise UsageError("--batch-size" if n_train >= 2 * accelerator.num_processes else "--train-subset",
                         f"BatchNorm needs at least 2 images per process and batch ({accelerator.num_processes} "
                         f"processes; {n_train} training images, batch size {args.batch_size})")
    if args.input_noise:
        noise = noise_inputs(n_train, data.image_size, args.seed, device)
        inputs = lambda idx: noise[idx].contiguous(memory_format=normalize.memory_format)  # noqa: E731
    else:
        inputs = lambda idx: normalize(distill_images[idx])  # noqa: E731
    return SimpleNamespace(data=data, probe_train=probe_train, evals=evals, distill_idx=distill_idx,
                           normalize=normalize, inputs=inputs, n_train=n_train)


def own_share(epoch_loss, rank: int, world: int) -> float:
    """This process's partial loss sum from a checkpoint: one per process, or (older checkpoints, or another
    number of processes) the whole sum on process 0."""
    if isinstance(epoch_loss, list) and len(epoch_loss) == world:
        return epoch_loss[rank]
    total = sum(epoch_loss) if isinstance(epoch_loss, list) else epoch_loss
    return total if rank == 0 else 0.0


def finite_parameters(net) -> bool:
    """Every parameter finite (one device sync, not one per tensor)."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in net.parameters()]).all())


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.push_only:
        return push_only(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    is_main, world, rank, device = (accelerator.is_main_process, accelerator.num_processes,
                                    accelerator.process_index, accelerator.device)
    out = Path(args.output_dir)
    if (out / "summary.json").exists() and not args.overwrite:
        previous = read_config(out)
        changed = changed_arguments(previous, args) if previous else []
        if changed:
            raise UsageError("--" + changed[0].replace("_", "-"),
                             f"{out} holds a finished run made with different arguments ({', '.join(changed)}); "
                             "pass --overwrite to replace it or use another --output-dir")
        accelerator.print(f"{out} already holds a finished run (summary.json); pass --overwrite to rerun it")
        return 0
    previous = resumable_config(out, args)
    set_seed(args.seed)
    d = load_distill_data(args, accelerator)
    data, probe_train, evals, normalize, inputs, n_train = (d.data, d.probe_train, d.evals, d.normalize, d.inputs,
                                                            d.n_train)

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
    # Starting over discards the folder's old results first, and only now: a command that failed earlier
    # (bad data, bad flags) has changed nothing on disk, and no folder ever mixes two runs.
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
    elif is_main:
        discard_run(out)
    accelerator.wait_for_everyone()
    run_id = previous["run_id"] if restored else new_run_id(out.name)
    config = {**vars(args), "run_id": run_id, "world_size": world,
              "autocast": accelerator.mixed_precision, "dataset_meta": data.meta,  # derived keys never
              "num_classes": data.num_classes, "data_image_size": data.image_size,  # shadow an argument
              "mean": data.mean, "std": data.std,
              "train_images": n_train, "steps_per_epoch": steps_per_epoch,
              "teacher_cache": not args.no_teacher_cache, "architecture": raw_student.config(),
              "environment": environment()}
    if is_main:
        write_json(out / "config.json", config)
    log.tracker = open_tracker(args, out, run_id, config, is_main, resume_step=position["step"] if restored else None)

    def feats(fn, images):
        return extract_features(fn, len(images), lambda i: normalize(images[i]), args.probe_batch_size,
                                accelerator, accelerator.autocast)

    def probe(subject: str, encoder_fn, train_features=None) -> dict:
        train = (train_features if train_features is not None else feats(encoder_fn, probe_train.images),
                 probe_train.labels)
        sets = {k: (feats(encoder_fn, s.images), s.labels) for k, s in evals.items()}
        return probe_features(train, sets, data.num_classes, args, subject)

    def probe_student(epoch: int, step: int, results: dict | None = None) -> None:
        raw_student.eval()
        results = (results or {}) | probe("student", raw_student.encoder)
        log.log(epoch, step, results)
        raw_student.train()
        if is_main:
            log.flush()
            tqdm.write(probe_line(epoch, step, results))

    # ---- the teacher's bottleneck input is cached (exact here: no augmentation, an eval-mode teacher that
    # never changes), so each step runs only its last layer. The teacher and the pixels are probed once.
    started = time.time() - position["elapsed"]
    use_cache = not args.no_teacher_cache
    shared_pass = use_cache and d.distill_idx is None and not args.input_noise and not restored
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
        probe_student(0, 0, results)
    del teacher_train

    distill_step = DistillStep(student, optimizer, accelerator, inputs, TeacherTargets(teacher, inputs, teacher_cache),
                               args.loss, args.teacher_temp, args.student_temp)
    bn_stats = BatchNormStats(raw_student) if args.log_dynamics else None

    @torch.no_grad()
    def param_distance() -> float:
        sq = sum(((ps.float() - pt.float()) ** 2).sum() for ps, pt in zip(raw_student.parameters(),
                                                                         teacher.parameters()))
        return math.sqrt(float(sq))

    def stop_if_diverged(finite: bool, what: str, epoch: int, step: int) -> None:
        """A non-finite loss or parameter ends the run: no student, summary or card; the checkpoints saved
        before it are kept. Every process decides on the same all-reduced or replicated values."""
        if finite:
            return
        if is_main:
            log.flush()
        kept = list_checkpoints(out / "checkpoints")
        raise RunFailed(f"the run diverged: non-finite {what} at epoch {epoch}, step {step}; no student, summary or "
                        f"model card was written, " + (f"the last good checkpoint {kept[0]} is kept" if kept else
                                                       "there was no checkpoint yet") +
                        " (lower --lr, check --teacher-temp / --student-temp, or try --mixed-precision no)")

    def checkpoint(epoch: int, batch: int, step: int, epoch_loss: torch.Tensor) -> None:
        stop_if_diverged(finite_parameters(raw_student), "parameters", epoch, step)  # never checkpoint NaNs
        # each process's own partial loss sum of the epoch, so a mid-epoch resume logs the exact epoch loss
        losses = accelerator.gather(epoch_loss.reshape(1)).tolist()
        state = {"epoch": epoch, "batch": batch, "step": step, "epoch_loss": losses, "rows": log.rows,
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
            epoch_loss = torch.tensor(own_share(position["epoch_loss"], rank, world) if epoch == position["epoch"]
                                      else 0.0, device=device)
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
                    diag["epoch_loss"] = epoch_loss  # a NaN at any earlier step stays in this sum
                    sums = accelerator.reduce(torch.stack(list(diag.values())) / len(batch), reduction="sum")
                    values = {f"train/{k}": v for k, v in zip(diag, sums.tolist()) if k != "epoch_loss"}
                    values["train/param_distance"] = param_distance()
                    values |= step_diagnostics(raw_student, optimizer, distill_step.grad_sq, args.log_dynamics)
                    values |= bn_stats.read() if bn_stats else {}
                    log.log(epoch, step, values)
                    stop_if_diverged(bool(sums.isfinite().all()), "loss", epoch, step)
                    # the CE is the teacher's entropy (up to log out-dim) plus the KL: the KL is what moves
                    bar.set_postfix(kl=f"{values['train/kl']:.3e}", dist=f"{values['train/param_distance']:.3g}")
                stop = preempt.received is not None
                if world > 1:  # every process must agree; a tiny all-reduce every 10 steps
                    stop = step % 10 == 0 and bool(accelerator.reduce(torch.tensor(float(stop), device=device)) > 0)
                if stop:
                    checkpoint(epoch, b + 1, step, epoch_loss)
                    accelerator.print(f"\n{preempt.received or 'signal'} received: checkpoint saved in "
                                      f"{out / 'checkpoints'} at step {step}; rerun the same command to resume (its "
                                      f"arguments: {shlex.join(sys.argv[1:] if argv is None else argv)})")
                    return 128 + getattr(signal, preempt.received or "SIGTERM")
            mean_loss = accelerator.reduce(epoch_loss, reduction="sum").item() / sum(len(b) for b in batches)
            log.log(epoch, step, {"train/loss": mean_loss})
            stop_if_diverged(math.isfinite(mean_loss), "loss", epoch, step)
            if epoch == args.epochs or (args.probe_every and epoch % args.probe_every == 0):
                probe_student(epoch, step)
            if args.checkpoint_every and epoch % args.checkpoint_every == 0 and epoch < args.epochs:
                checkpoint(epoch + 1, 0, step, torch.zeros((), device=device))
        stop_if_diverged(finite_parameters(raw_student), "parameters", args.epochs, step)
    finally:  # also on errors: an in-process caller gets its signal handlers back
        bar.close()
        preempt.restore()
        if log.tracker is not None:
            log.tracker.finish()
    pushed = write_results(args, out, config, log, raw_student, step, started, is_main, run_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0 if pushed else 1


def write_results(args, out: Path, config: dict, log, raw_student, step: int, started: float, is_main: bool,
                  run_id: str) -> bool:
    """The finished run's student, card, tables and figure (main process), then the optional push. summary.json
    is written last among the results: it marks the folder as holding a finished run."""
    if not is_main:
        return True
    summary = summarize(log.frame())
    table = probe_table(summary)
    log.flush()
    config |= {"steps": step, "wall_time_s": round(time.time() - started, 1)}
    write_json(out / "config.json", config)
    raw_student.save_pretrained(out / "student")
    write_model_card(out / "student", config, table)
    write_table(out / "probe_table.csv", table.reset_index())
    plot_probes(log.frame(), out / "probe_accuracy.png",
                f"{args.model} on {Path(args.dataset).name}, alpha={args.alpha:g}, {step} steps")
    write_json(out / "summary.json", {"probes": summary, "steps": step, "epochs": args.epochs,
                                      "run_id": run_id, "wall_time_s": config["wall_time_s"]})
    discard_run(out, only=("checkpoints",))  # finished: student/ and the tables hold it all
    print(f"\nProbe accuracy (%) after {step} steps, {config['wall_time_s']:.0f} s -> {out}")
    print(format_table(table))
    return not args.push_to_hub or push_or_explain(out, args.push_to_hub, run_id, args.hub_private,
                                                   "train_distill.py")


if __name__ == "__main__":
    sys.exit(main())
