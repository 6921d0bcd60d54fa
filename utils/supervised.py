"""The supervised SGD recipe shared by imp.py and lmc.py (paper App. C.5).

Encoder + fresh linear classifier (the DINO head is dropped); SGD momentum 0.9, lr 0.1 x0.1 at epochs 80 and
120, 160 epochs, weight decay 1e-4, batch 256, random flip + 4-px padded crop on the device (train only). The
data order and the augmentation of an epoch are functions of (data seed, epoch) only and the learning rate a
function of the epoch, so a run resumes exactly from any step and two runs differ only where their seeds do.
"""
from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from utils.cli import RunFailed, UsageError
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
              on_epoch_end=None, on_fresh_start=None) -> dict | None:
        """Train epochs start_epoch+1 .. recipe.epochs from the current state, resuming from
        `folder/checkpoints` when an interrupted run left one. Returns {best, final, best_epoch, steps}, or None
        when SIGTERM/SIGUSR1 arrived (a checkpoint was written at that step). `on_epoch_end(epoch)` runs after
        each epoch (rewind points); `on_fresh_start()` before the first step when no checkpoint was resumed."""
        acc, recipe = self.accelerator, self.recipe
        n, world = len(self.train_labels), acc.num_processes
        log = MetricLog(folder / "metrics.csv")
        pos = {"epoch": start_epoch + 1, "batch": 0, "step": 0, "loss": 0.0, "best": -1.0, "best_epoch": 0}
        restored = load_latest_checkpoint(acc, folder / "checkpoints")
        if restored:
            pos, log.rows = {k: restored[k] for k in pos}, restored["rows"]
        elif on_fresh_start is not None:
            on_fresh_start()
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

        def stop_if_diverged(finite: bool, what: str, epoch: int) -> None:
            """A non-finite loss or weight ends the run before anything records it as finished (no final.pt,
            result.json or rewind point); the checkpoints saved before it are kept."""
            if finite:
                return
            if acc.is_main_process:
                log.flush()
            kept = list_checkpoints(folder / "checkpoints")
            raise RunFailed(f"{desc} diverged: non-finite {what} at epoch {epoch}, step {pos['step']}; nothing in "
                            f"{folder} was recorded as finished, " + (f"the last good checkpoint {kept[0]} is kept"
                                                                        if kept else "there was no checkpoint yet")
                            + " (lower --lr or check --lr-decay / --weight-decay / --momentum)")

        def checkpoint(epoch, batch, loss):
            stop_if_diverged(finite_state(self.raw) and math.isfinite(loss), "weights", epoch)  # never save NaNs
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
                stop_if_diverged(math.isfinite(values["train/loss"]), "loss", epoch)
                stop_if_diverged(finite_state(self.raw), "weights", epoch)
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


def finite_state(model: nn.Module) -> bool:
    """Every parameter and floating buffer (BN statistics) finite; one device sync."""
    tensors = [t.detach() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def save_state_file(path: Path, state: dict, **extra) -> None:
    with atomic_path(path) as tmp:
        torch.save({**state, **extra}, tmp)


def load_state_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_supervised_state(path: Path, flag: str) -> dict:
    """A supervised state file given by the user ({model, epoch[, optimizer]}, as imp.py's rewind points and
    final.pt are saved), loaded without running code; anything else is one UsageError naming `flag`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any load failure means: not such a file
        raise UsageError(flag, f"{path} is not a supervised state file that torch.load reads "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UsageError(flag, f"{path} holds no supervised state (no 'model' entry of weights)")
    if not isinstance(state.get("epoch", 0), int) or state.get("epoch", 0) < 0:
        raise UsageError(flag, f"{path} holds no valid 'epoch' (got {str(state.get('epoch'))[:40]})")
    return state


def check_state_fits(state: dict, model: nn.Module, path: Path, flag: str) -> None:
    """`state['model']` has exactly the tensors (names and shapes) of `model`: the same architecture and number
    of classes. Otherwise one UsageError naming `flag` that says how they differ (not the whole state dict)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or shapes:
        detail = "; ".join(filter(None, [
            missing and f"{len(missing)} tensor(s) missing (e.g. {missing[0]})",
            extra and f"{len(extra)} unexpected (e.g. {extra[0]})",
            shapes and f"{len(shapes)} of another shape (e.g. {shapes[0]}: {got[shapes[0]]} vs {want[shapes[0]]})"]))
        raise UsageError(flag, f"{path} is a network of another architecture or number of classes than the "
                               f"--student on this dataset: {detail}")


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


# Arguments of the supervised recipe and its data that change a number (utils.fingerprint): the rest (evaluation
# batch size, checkpoint options, output and Hub options) change none.
SUPERVISED_SETTINGS = ("dataset", "image_column", "label_column", "train_split", "test_split", "revision", "image_size",
                       "epochs", "lr", "lr_milestones", "lr_decay", "momentum", "weight_decay", "batch_size",
                       "crop_padding", "no_flip", "head_seed", "eval_every")
# What imp.py / lmc.py folders held before each student had a subfolder (replaced with --overwrite only).
OLD_LAYOUT = ("seed-*", "student", "init", "checkpoint")


def load_students(args) -> list[SimpleNamespace]:
    """Every --student, loaded: its network, run config, reference, weights hash and subfolder name
    (`<name>-<first 8 hex of the hash>`). All of one architecture (one trainer serves them) and one dataset."""
    from utils import fingerprint

    students = []
    for ref in args.student or [None]:  # none given: load_student says --student is required
        net, run_config = load_student(ref, args.student_revision)
        digest = fingerprint.weights_hash(net)
        for other in students:
            if other.hash == digest:
                raise UsageError("--student", f"{other.ref} and {ref} are the same student (weights hash "
                                              f"{fingerprint.short(digest)}); give each one once")
            if other.net.arch != net.arch:
                diff = ", ".join(f"{k} {other.net.arch[k]} vs {net.arch[k]}" for k in net.arch
                                 if net.arch[k] != other.net.arch.get(k))
                raise UsageError("--student", f"{other.ref} and {ref} have different architectures ({diff}); "
                                              "results are aggregated across students of one architecture")
        students.append(SimpleNamespace(net=net, run_config=run_config, ref=ref, hash=digest,
                                        name=fingerprint.display_name(ref),
                                        folder=f"{fingerprint.display_name(ref)}-{fingerprint.short(digest)}"))
    datasets = {dataset_of(args, s.run_config) for s in students}
    if len(datasets) > 1:
        raise UsageError("--dataset", f"the students were distilled on different datasets "
                                      f"({', '.join(sorted(datasets))}); name the one to train on")
    args.dataset = datasets.pop()
    return students


def default_folder(kind: str, students) -> Path:
    """runs/<kind>-<student name>-<weights hash>; several: runs/<kind>-<first name>-and-<n-1>-more-<hash of all>."""
    from utils import fingerprint

    if len(students) == 1:
        return Path("runs") / f"{kind}-{students[0].folder}"
    combined = hashlib.sha256(" ".join(sorted(s.hash for s in students)).encode()).hexdigest()
    return Path("runs") / f"{kind}-{students[0].name}-and-{len(students) - 1}-more-{fingerprint.short(combined)}"


def setup_run(args, kind: str, defines: dict, outputs: tuple[str, ...], check=None):
    """What imp.py and lmc.py both build from their flags: the --students, the run folder (checked against its
    fingerprint before anything else: see utils.fingerprint), the dataset (uint8 tensors on the device) and one
    SupervisedTrainer; then, the run being ready, the folder's old results are discarded if --overwrite replaces
    them and the fingerprints are written (the folder's and each student's subfolder's), with a per-invocation
    config (parallel Slurm jobs share the folder). `defines`: the script's own arguments that change a number;
    `outputs`: the files the script writes at the top of the folder and in each subfolder. `check(students, data,
    trainer)` runs the script's checks that need the students, the data or the network before anything is
    deleted or written, so a refused command changes nothing. Returns (students, data, trainer, out, run_id)."""
    from accelerate import Accelerator

    from utils import fingerprint
    from utils.cli import check_output_dir, writing_to
    from utils.data import Normalizer, load_dataset
    from utils.hub import new_run_id
    from utils.results import environment, write_json

    students = load_students(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    out = Path(args.output_dir) if args.output_dir else check_output_dir("--output-dir", default_folder(kind, students))
    dataset = args.dataset
    common = {**fingerprint.settings(args, SUPERVISED_SETTINGS),
              "--dataset": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset,
              "--mixed-precision": accelerator.mixed_precision, **defines}
    top = {"--student": sorted(s.hash for s in students), **common}
    previous = fingerprint.read(out) or {}
    known = {entry["weights_sha256"]: entry["folder"] for entry in previous.get("students", [])}
    for s in students:  # a student already in the folder keeps its subfolder, whatever path it is given by now
        s.folder = known.get(s.hash, s.folder)
    owned = sorted({out / s.folder for s in students} | {out / s["folder"] for s in previous.get("students", [])} |
                   {out / name for name in (*outputs, "configs")} |
                   {p for pattern in OLD_LAYOUT for p in out.glob(pattern)})
    state = fingerprint.check(out, kind, top, args.overwrite, owned)
    if state == "continue":  # the same students and settings: each subfolder must agree too
        for s in students:
            fingerprint.check(out / s.folder, kind, {**common, "--student": s.hash}, False,
                              [out / s.folder / name for name in outputs])
    with accelerator.main_process_first():
        data = load_dataset(dataset, args.image_column, args.label_column, args.train_split, args.test_split,
                            args.revision, args.image_size, args.data_cache)
    first = students[0].net
    shape = Classifier(first.encoder, first.embed_dim, data.num_classes, args.head_seed)  # states load into it
    trainer = SupervisedTrainer(accelerator, shape, args.recipe, data, Normalizer(data.mean, data.std,
                                accelerator.device), args.eval_batch_size, args.eval_every, args.checkpoint_every,
                                args.keep_checkpoints)
    if "init" in getattr(args, "starts", ()):
        for s in students:  # a student without the seeds that rebuild its initialisation: refused now
            start_encoder(s.net, "init")
    if check is not None:
        check(students, data, trainer)
    run_id = new_run_id(out.name)
    about = [{"ref": s.ref, "folder": s.folder, "weights_sha256": s.hash, "config": s.net.config()} for s in students]
    config = {**{k: v for k, v in vars(args).items() if k != "recipe"}, "run_id": run_id, "students": about,
              "num_classes": data.num_classes, "world_size": accelerator.num_processes, "environment": environment()}
    trainer.report = (args, out, config, run_id)  # for --report-to: one tracker run per round / copy folder
    if accelerator.is_main_process:  # ready and checked: only now is anything deleted or written
        writing_to(out)
        if state == "replace":
            fingerprint.discard(out, owned)
        if fingerprint.read(out) is None:
            fingerprint.write(out, kind, top, students=about)
        for s, entry in zip(students, about):
            if fingerprint.read(out / s.folder) is None:
                fingerprint.write(out / s.folder, kind, {**common, "--student": s.hash}, students=[entry])
        write_json(out / "configs" / f"{run_id}.json", config)
    accelerator.wait_for_everyone()
    return students, data, trainer, out, run_id
