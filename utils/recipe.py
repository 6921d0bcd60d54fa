"""The supervised recipe's flags and values, and the names imp.py / lmc.py accept (starts, prune scopes, BN modes).

Torch-free on purpose, like utils.cli and utils.choices: imp.py and lmc.py check their flags with this module
before they import torch, so a bad flag is reported in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.cli import UsageError, check_range

SCOPES = ("weights", "all")
BN_MODES = ("recompute", "interpolate")
STARTS = ("student", "init")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 160
    lr: float = 0.1
    lr_milestones: tuple[int, ...] = (80, 120)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    crop_padding: int = 4
    flip: bool = True

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based `epoch`: epochs 1-80 at lr, 81-120 at lr/10, 121-160 at lr/100."""
        return self.lr * self.lr_decay ** sum(epoch > m for m in self.lr_milestones)


def add_student_args(p) -> None:
    """The starting point and the data: --student (the existing loader's three forms) and the data flags."""
    from utils.cli import add_data_args

    p.add_argument("--student", nargs="+", metavar="RUN", help="train_distill.py run folder, save_pretrained "
                   "folder or Hub model id; several: one subfolder each, results aggregated across them")
    p.add_argument("--student-revision", help="Hub revision of the student")
    add_data_args(p, default_dataset=None)


def add_recipe_args(p) -> None:
    g = p.add_argument_group("supervised SGD recipe (SPEC §5; defaults are the paper's)")
    g.add_argument("--epochs", type=int, default=160)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--lr-milestones", type=int, nargs="*", default=[80, 120], help="epochs after which lr decays")
    g.add_argument("--lr-decay", type=float, default=0.1, help="lr factor at each milestone")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD (coupled) weight decay, every parameter")
    g.add_argument("--batch-size", type=int, default=256, help="global batch size (split across processes)")
    g.add_argument("--crop-padding", type=int, default=4, help="zero padding (pixels) of the random crop; 0: none")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--head-seed", type=int, default=0, help="seed of the fresh linear classifier's init")
    g.add_argument("--eval-every", type=int, default=1, help="test accuracy every N epochs (and at the end)")
    g.add_argument("--eval-batch-size", type=int, default=1000)
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default: the accelerate config's")
    g.add_argument("--checkpoint-every", type=int, default=10,
                   help="resumable checkpoint every N epochs (0: only on SIGTERM/SIGUSR1)")
    g.add_argument("--keep-checkpoints", type=int, default=2)


def recipe_from_args(args) -> Recipe:
    """Check the recipe flags (before any data is loaded) and return the Recipe."""
    check_range("--epochs", args.epochs, integer_min=1)
    check_range("--batch-size", args.batch_size, integer_min=2)
    check_range("--crop-padding", args.crop_padding, integer_min=0)
    check_range("--eval-every", args.eval_every, integer_min=1)
    check_range("--eval-batch-size", args.eval_batch_size, integer_min=1)
    check_range("--checkpoint-every", args.checkpoint_every, integer_min=0)
    check_range("--keep-checkpoints", args.keep_checkpoints, integer_min=1)
    check_range("--momentum", args.momentum, 0.0, 1.0)
    if not args.lr > 0:
        raise UsageError("--lr", f"must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        raise UsageError("--weight-decay", f"must be >= 0, got {args.weight_decay}")
    return Recipe(args.epochs, args.lr, tuple(args.lr_milestones), args.lr_decay, args.momentum, args.weight_decay,
                  args.batch_size, args.crop_padding, not args.no_flip)
