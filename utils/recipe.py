"""The supervised recipe's flags and values, and the names imp.py / lmc.py accept (starts, prune scopes, BN modes).

Torch-free on purpose, like utils.cli and utils.choices: imp.py and lmc.py check their flags with this module
before they import torch, so a bad flag is reported in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.cli import UsageError

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


def default_milestones(epochs: int) -> tuple[int, ...]:
    """The paper's schedule scaled to `epochs`: decay after 50 % and 75 % of the epochs (80 and 120 of 160);
    milestones that would fall at epoch 0 or merge are dropped (1 epoch: none; 2 epochs: after epoch 1)."""
    return tuple(sorted({m for m in (epochs // 2, 3 * epochs // 4) if 0 < m < epochs}))


def add_recipe_args(p) -> None:
    from utils.cli import count, fraction, non_negative, positive

    g = p.add_argument_group("supervised SGD recipe (paper App. C.5; the defaults are the paper's)")
    g.add_argument("--epochs", type=count(1), default=160, help="training epochs of every run (IMP round, LMC copy)")
    g.add_argument("--lr", type=positive, default=0.1, help="SGD learning rate before the first milestone")
    g.add_argument("--lr-milestones", type=count(1), nargs="*", metavar="EPOCH",
                   help="epochs after which the learning rate is multiplied by --lr-decay, each before --epochs "
                        "(default: 50 %% and 75 %% of --epochs: 80 120 for 160 epochs)")
    g.add_argument("--lr-decay", type=positive, default=0.1, help="learning-rate factor at each milestone")
    g.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum, in [0, 1]")
    g.add_argument("--weight-decay", type=non_negative, default=1e-4,
                   help="SGD (coupled) weight decay, every parameter")
    g.add_argument("--batch-size", type=count(2), default=256, help="global batch size (split across processes)")
    g.add_argument("--crop-padding", type=count(0), default=4,
                   help="zero padding (pixels) of the random crop; 0: none")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--head-seed", type=count(0), default=0, help="seed of the fresh linear classifier's init")
    g.add_argument("--eval-every", type=count(1), default=1, help="test accuracy every N epochs (and at the end)")
    g.add_argument("--eval-batch-size", type=count(1), default=1000, help="test images per forward pass")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default: the accelerate config's")
    g.add_argument("--checkpoint-every", type=count(0), default=10,
                   help="resumable checkpoint every N epochs (0: only on SIGTERM/SIGUSR1)")
    g.add_argument("--keep-checkpoints", type=count(1), default=2, help="how many of the newest checkpoints to keep")


def recipe_from_args(args) -> Recipe:
    """The Recipe of the (range-checked) flags; milestones default to the paper's fractions of --epochs, and one
    at or after --epochs is refused: the learning rate would silently never decay there."""
    if args.lr_milestones is None:
        args.lr_milestones = list(default_milestones(args.epochs))
    late = [m for m in args.lr_milestones if m >= args.epochs]
    if late:
        raise UsageError("--lr-milestones", f"milestone {late[0]} is not before --epochs {args.epochs}, so the "
                                            f"learning rate would never decay there; use epochs in [1, "
                                            f"{args.epochs - 1}] (the default scales 80 120 of 160 to --epochs)")
    return Recipe(args.epochs, args.lr, tuple(args.lr_milestones), args.lr_decay, args.momentum, args.weight_decay,
                  args.batch_size, args.crop_padding, not args.no_flip)
