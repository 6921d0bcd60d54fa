"""The supervised SGD recipe shared by imp.py and lmc.py (SPEC §5, paper App. C.5).

Encoder + fresh linear classifier (the DINO head is dropped); SGD momentum 0.9, lr 0.1 x0.1 at epochs 80 and
120, 160 epochs, weight decay 1e-4, batch 256, random flip + 4-px padded crop on the device (train only). The
data order and the augmentation of an epoch are functions of (data seed, epoch) only and the learning rate a
function of the epoch, so a run resumes exactly from any step and two runs differ only where their seeds do.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.checkpoint import load_latest_checkpoint, save_checkpoint
from utils.cli import UsageError
from utils.data import epoch_batches, rank_slice
from utils.probing import extract_features
from utils.pruning import apply_masks
from utils.recipe import Recipe
from utils.results import MetricLog, atomic_path
from utils.tracking import open_tracker

AUGMENT_SALT = 7_777_777_777  # keeps the augmentation stream apart from epoch_order's generator seeds


# ------------------------------------------------------------------------------------------- networks
class Classifier(nn.Module):
    """An encoder and a linear classifier on its output (parameter names `encoder.*`, `fc.*`)."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int, head_seed: int):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).train()
        self.fc = nn.Linear(embed_dim, num_classes)
        bound = 1 / math.sqrt(embed_dim)  # nn.Linear's default uniform init, from a seeded generator (official)
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=g)
            self.fc.bias.uniform_(-bound, bound, generator=g)

    def forward(self, x):
        return self.fc(self.encoder(x))


def start_encoder(student, start: str) -> nn.Module:
    """`student`: the distilled student's encoder (theta_S*); `init`: its initialisation theta_S, rebuilt
    exactly from the seeds and alpha stored with it."""
    if start == "student":
        return student.encoder
    try:
        return student.build_init().encoder
    except ValueError as err:
        raise UsageError("--student", f"{err} (start 'init')") from None


# --------------------------------------------------------------------------------------- augmentation
def epoch_augmentation(n: int, seed: int, epoch: int, recipe: Recipe, device):
    """Per-image crop offsets (n x 2, in [0, 2 * padding]) and flips (n) of one epoch: f(seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + AUGMENT_SALT)
    shifts = torch.randint(0, 2 * recipe.crop_padding + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return shifts.to(device), (flips & recipe.flip).to(device)


def crop_and_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random padded crop + horizontal flip of uint8 images in one gather. Padding is black in pixel space
    (as torchvision pads the raw image), so after normalisation it is -mean/std, not 0."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = shifts[:, 0, None] + torch.arange(h, device=images.device)
    cols = shifts[:, 1, None] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


# -------------------------------------------------------------------------------------------- training
class SupervisedTrainer:
    """One prepared model and SGD optimiser, reused for every run of a script (IMP rounds, LMC copies): each run
    sets their state (`load_state`) and trains; Accelerate's checkpoints then always hold the same objects."""

    def __init__(self, accelerator, model: nn.Module, recipe: Recipe, data, normalize, eval_batch_size=1000,
                 eval_every=1, checkpoint_every=10, keep_checkpoints=2):
        self.accelerator, self.recipe, self.normalize = accelerator, recipe, normalize
        self.eval_batch_size, self.eval_every = eval_batch_size, eval_every
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        device, self.num_classes = accelerator.device, data.num_classes
        self.train_images, self.train_labels = data.train.images.to(device), data.train.labels.to(device)
        self.test_images, self.test_labels = data.test.images.to(device), data.test.labels.to(device)
        model = model.to(device)
        if accelerator.num_processes > 1 and device.type == "cuda":  # BN over the global batch, as on one GPU
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw = accelerator.unwrap_model(self.model)
        self.fresh_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.masks: dict | None = None
        # --report-to: (the script's args, its output folder, the invocation's config and run id); set by setup_run
        self.report: tuple | None = None

    # ---- state
    def state(self) -> dict:
        """Model (parameters and BN buffers) and optimiser state, as CPU copies."""
        return {"model": {k: v.detach().cpu().clone() for k, v in self.raw.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state(self, state: dict, optimizer: bool = True) -> None:
        """Set the model (and the optimiser's momentum, or a fresh optimiser) from `state`; re-apply masks."""
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"] if optimizer and "optimizer" in state
                                       else self.fresh_optimizer)
        if self.masks is not None:
            apply_masks(self.raw, self.masks)

    # ---- one step and evaluation
    def step(self, batch: torch.Tensor, shifts, flips) -> torch.Tensor:
        """One SGD step on this process's share of the global `batch`; returns the summed loss (device)."""
        idx = rank_slice(batch, self.accelerator.process_index, self.accelerator.num_processes)
        x = self.normalize(crop_and_flip(self.train_images[idx], shifts[idx], flips[idx], self.recipe.crop_padding))
        with self.accelerator.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), self.train_labels[idx], reduction="sum")
        # sum x world / global batch: DDP's gradient average is then exactly the global-batch mean
        self.accelerator.backward(loss * (self.accelerator.num_processes / len(batch)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masks is not None:
            apply_masks(self.raw, self.masks)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> float:
        """Top-1 test accuracy of `model` (default: the trained one) in eval mode, on clean test images."""
        model = model or self.raw
        was_training = model.training
        model.eval()
        logits = extract_features(model, len(self.test_labels), lambda i: self.normalize(self.test_images[i]),
                                  self.eval_batch_size, self.accelerator, self.accelerator.autocast)
        model.train(was_training)
        return float((logits.argmax(1) == self.test_labels).float().mean())

    # ---- a run
    def train(self, folder: Path, data_seed: int, start_epoch: int, preempt, desc: str = "train",
              on_epoch_end=None) -> dict | None:
        """Train epochs start_epoch+1 .. recipe.epochs from the current state, resuming from
        `folder/checkpoints` when an interrupted run left one. Returns {best, final, best_epoch, steps}, or None
        when SIGTERM/SIGUSR1 arrived (a checkpoint was written at that step). `on_epoch_end(epoch)` runs after
        each epoch (rewind points)."""
        acc, recipe = self.accelerator, self.recipe
        n, world = len(self.train_labels), acc.num_processes
        log = MetricLog(folder / "metrics.csv")
        pos = {"epoch": start_epoch + 1, "batch": 0, "step": 0, "loss": 0.0, "best": -1.0, "best_epoch": 0}
        restored = load_latest_checkpoint(acc, folder / "checkpoints")
        if restored:
            pos, log.rows = {k: restored[k] for k in pos}, restored["rows"]
        # one tracker run per run folder, named once and kept in its checkpoints so a resumption continues it
        tracker_run = (restored or {}).get("tracker_run")
        if self.report is not None:
            args, root, config, run_id = self.report
            where = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else folder.name
            tracker_run = tracker_run or f"{run_id}/{where}"
            config = config | {"run_folder": where, "data_seed": data_seed, "start_epoch": start_epoch}
            log.tracker = open_tracker(args, folder, tracker_run, config, acc.is_main_process, group=root.name,
                                       resume_step=pos["step"] if restored else None)
        steps_per_epoch = len(epoch_batches(n, recipe.batch_size, data_seed, 1, world))
        bar = tqdm(total=(recipe.epochs - start_epoch) * steps_per_epoch, initial=pos["step"], desc=desc,
                   disable=not acc.is_main_process, dynamic_ncols=True, leave=False)

        def checkpoint(epoch, batch, loss):
            state = {**pos, "epoch": epoch, "batch": batch, "loss": loss, "rows": log.rows,
                     "tracker_run": tracker_run}
            save_checkpoint(acc, folder / "checkpoints", pos["step"], state, self.keep_checkpoints)

        accuracy = math.nan
        try:
            for epoch in range(pos["epoch"], recipe.epochs + 1):
                for group in self.optimizer.param_groups:
                    group["lr"] = recipe.lr_at(epoch)
                self.model.train()
                batches = [b.to(acc.device) for b in epoch_batches(n, recipe.batch_size, data_seed, epoch, world)]
                shifts, flips = epoch_augmentation(n, data_seed, epoch, recipe, acc.device)
                resuming = epoch == pos["epoch"]
                loss = torch.tensor(pos["loss"] if resuming else 0.0, device=acc.device)
                for b in range(pos["batch"] if resuming else 0, len(batches)):
                    loss += self.step(batches[b], shifts, flips)
                    pos["step"] += 1
                    bar.update(1)
                    stop = preempt.received is not None
                    if world > 1:  # every process must agree; a tiny all-reduce
                        stop = bool(acc.reduce(torch.tensor(float(stop), device=acc.device)) > 0)
                    if stop:
                        checkpoint(epoch, b + 1, loss.item())
                        acc.print(f"\n{preempt.received or 'signal'} received: checkpoint saved in "
                                  f"{folder / 'checkpoints'}; rerun the same command to resume")
                        return None
                values = {"train/loss": acc.reduce(loss, reduction="sum").item() / sum(map(len, batches)),
                          "lr": recipe.lr_at(epoch)}
                if epoch % self.eval_every == 0 or epoch == recipe.epochs:
                    accuracy = self.evaluate()
                    values["test/accuracy"] = accuracy
                    if accuracy > pos["best"]:
                        pos["best"], pos["best_epoch"] = accuracy, epoch
                    bar.set_postfix(acc=f"{accuracy:.4f}")
                log.log(epoch, pos["step"], values)
                if on_epoch_end is not None:
                    on_epoch_end(epoch)
                if self.checkpoint_every and epoch % self.checkpoint_every == 0 and epoch < recipe.epochs:
                    checkpoint(epoch + 1, 0, 0.0)
        finally:
            bar.close()
            if log.tracker is not None:
                log.tracker.finish()
        if acc.is_main_process:
            log.flush()
        return {"best": pos["best"], "final": accuracy, "best_epoch": pos["best_epoch"], "steps": pos["step"]}


def save_state_file(path: Path, state: dict, **extra) -> None:
    with atomic_path(path) as tmp:
        torch.save({**state, **extra}, tmp)


def load_state_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_student(ref: str, revision: str | None = None):
    """utils.hub.resolve_student (every way a reference fails to load is one line naming --student)."""
    from utils.hub import resolve_student

    if not ref:
        raise UsageError("--student", "required (a train_distill.py run folder, a save_pretrained folder or a Hub id)")
    return resolve_student(ref, revision=revision)


def dataset_of(args, run_config) -> str:
    dataset = args.dataset or (run_config or {}).get("dataset")
    if dataset is None:
        raise UsageError("--dataset", "required when --student is not a train_distill.py run folder")
    return dataset


def setup_run(args, kind: str):
    """What imp.py and lmc.py both build from their flags: the --student, the dataset (uint8 tensors on the
    device), the run folder with a per-invocation config (parallel Slurm jobs share the folder), and one
    SupervisedTrainer. Returns (student, data, trainer, out, run_id)."""
    from accelerate import Accelerator

    from utils.data import Normalizer, load_dataset
    from utils.hub import new_run_id
    from utils.results import environment, write_json

    student, run_config = load_student(args.student, args.student_revision)
    dataset = dataset_of(args, run_config)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    with accelerator.main_process_first():
        data = load_dataset(dataset, args.image_column, args.label_column, args.train_split, args.test_split,
                            args.revision, args.image_size, args.data_cache)
    out = Path(args.output_dir or f"runs/{kind}-{Path(dataset).name}-{student.arch['model']}")
    run_id = new_run_id(out.name)
    config = {**{k: v for k, v in vars(args).items() if k != "recipe"}, "dataset": dataset, "run_id": run_id,
              "student_config": student.config(), "num_classes": data.num_classes,
              "world_size": accelerator.num_processes, "environment": environment()}
    if accelerator.is_main_process:
        write_json(out / "configs" / f"{run_id}.json", config)
    shape = Classifier(student.encoder, student.embed_dim, data.num_classes, args.head_seed)  # states load into it
    trainer = SupervisedTrainer(accelerator, shape, args.recipe, data, Normalizer(data.mean, data.std,
                                accelerator.device), args.eval_batch_size, args.eval_every, args.checkpoint_every,
                                args.keep_checkpoints)
    trainer.report = (args, out, config, run_id)
    return student, data, trainer, out, run_id
