#!/usr/bin/env python
"""Linear mode connectivity of SGD copies trained from one start (paper §6, Fig. 10).

    accelerate launch lmc.py --student runs/distill-cifar10-resnet18-a1e-10-s0 --copies 5
    python lmc.py --student runs/digits-student --epochs 4 --lr-milestones 2 3 --copies 3      # CPU-sized

From each start, K copies are trained with the SPEC §5 SGD recipe, differing only in their data seed (data
order and augmentation); every pair is evaluated at --gammas evenly spaced points of the segment
(1 - gamma) theta_i + gamma theta_j, with BatchNorm statistics recomputed at every point on a fixed training
subset (default) or interpolated with the weights. Starts: `student` (theta_S*), `init` (its initialisation
theta_S) and `checkpoint` (a supervised checkpoint, e.g. an imp.py rewind point, continued from its epoch).
Writes lmc_table.csv (one row per pair), lmc_curves.csv, lmc_summary.csv and lmc.png to --output-dir.
"""
from __future__ import annotations

import copy
import itertools
import shutil
import sys
from pathlib import Path

from utils.cli import (ArgumentParser, UsageError, add_report_args, check_range, check_report_folder, count,
                       main_guard)
from utils.recipe import BN_MODES, STARTS, add_recipe_args, add_student_args, recipe_from_args

OUTPUTS = ("lmc_table.csv", "lmc_curves.csv", "lmc_summary.csv", "lmc.png")
LABELS = {"student": "start: student θ_S*", "init": "start: initialisation θ_S", "checkpoint": "start: checkpoint"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@")
    add_student_args(p)
    m = p.add_argument_group("mode connectivity (SPEC §6)")
    m.add_argument("--starts", nargs="+", choices=STARTS + ("checkpoint",), default=list(STARTS),
                   help="the starts to compare, side by side in the figure")
    m.add_argument("--checkpoint", help="start `checkpoint`: a supervised state file (an imp.py rewind point "
                                        "seed-*/init/round-0/rewind/epoch-L.pt); copies continue from epoch L")
    m.add_argument("--copies", type=count(2), default=5, help="copies per start (K >= 2), data seeds S .. S+K-1")
    m.add_argument("--data-seed", type=count(0), default=0, help="data seed S of the first copy")
    m.add_argument("--gammas", type=count(2), default=50, help="evenly spaced points on each segment, ends included")
    m.add_argument("--bn", choices=BN_MODES, default="recompute",
                   help="BatchNorm statistics at each point: recomputed on a fixed training subset, or interpolated")
    m.add_argument("--bn-subset", type=count(1), default=2000,
                   help="training images (un-augmented) for recomputation")
    m.add_argument("--bn-batch-size", type=count(2), default=500, help="images per pass when recomputing BN")
    m.add_argument("--bn-seed", type=count(0), default=0, help="which training images form the BN subset")
    add_recipe_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/lmc-<dataset>-<model>")
    r.add_argument("--report-only", action="store_true", help="no training or interpolation: redraw from the tables")
    r.add_argument("--push-to-hub", metavar="REPO", help="upload the tables and the figure to lmc/<id>/ in REPO")
    r.add_argument("--hub-private", action="store_true")
    add_report_args(r)
    args = p.parse_args(argv)
    args.recipe = recipe_from_args(args)
    if ("checkpoint" in args.starts) != bool(args.checkpoint):
        raise UsageError("--checkpoint", "give --checkpoint FILE exactly when --starts includes checkpoint")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError("--checkpoint", f"no such file {args.checkpoint!r}")
    check_report_folder(args, "LMC")
    return args


if __name__ == "__main__":  # torch takes seconds to import: report a bad flag before that
    main_guard(parse_args)()

# ruff: noqa: E402  (the heavy imports below follow the flag check on purpose)
import pandas as pd
import torch
from tqdm.auto import tqdm

from utils.checkpoint import PreemptionSignal
from utils.hub import new_run_id, push_tables
from utils.lmc import barriers, error_along_path
from utils.results import atomic_path, markdown_table, write_json, write_table
from utils.supervised import Classifier, load_state_file, save_state_file, setup_run, start_encoder


def start_state(start: str, student, args, num_classes: int) -> dict:
    """{model, epoch[, optimizer]} the copies of `start` begin from (all share the same classifier init)."""
    if start == "checkpoint":
        state = load_state_file(Path(args.checkpoint))
        if not isinstance(state, dict) or "model" not in state:
            raise UsageError("--checkpoint", f"{args.checkpoint} holds no supervised state (no 'model' entry)")
        if state.get("epoch", 0) >= args.epochs:
            raise UsageError("--checkpoint", f"its epoch {state.get('epoch')} is not before --epochs {args.epochs}")
        return state
    net = Classifier(start_encoder(student, start), student.embed_dim, num_classes, args.head_seed)
    return {"model": net.state_dict(), "epoch": 0}


def train_copies(trainer, state: dict, args, folder: Path, preempt) -> list[dict] | None:
    """The K copies of one start (finished ones are skipped); their final states, or None if interrupted."""
    finals = []
    for seed in range(args.data_seed, args.data_seed + args.copies):
        copy_dir = folder / f"copy-{seed}"
        if not (copy_dir / "result.json").exists():
            trainer.load_state(state)  # momentum too when the start is a checkpoint that carries it
            result = trainer.train(copy_dir, seed, state.get("epoch", 0), preempt, f"{folder.name} copy {seed}")
            if result is None:
                return None
            if trainer.accelerator.is_main_process:
                save_state_file(copy_dir / "final.pt", {"model": trainer.state()["model"]})
                write_json(copy_dir / "result.json", {"data_seed": seed, **result})
                shutil.rmtree(copy_dir / "checkpoints", ignore_errors=True)
            trainer.accelerator.wait_for_everyone()
        finals.append(load_state_file(copy_dir / "final.pt")["model"])
    return finals


def plot(curves: pd.DataFrame, path: Path, title: str) -> None:
    """Fig. 10: test error along gamma, a thin line per pair and their mean in bold, one panel per start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = list(dict.fromkeys(curves.start))
    fig, axes = plt.subplots(1, len(starts), figsize=(4.4 * len(starts), 3.6), sharey=True, squeeze=False)
    for ax, start, color in zip(axes[0], starts, ("C0", "C3", "C2")):
        own = curves[curves.start == start]
        for _, pair in own.groupby(["copy_i", "copy_j"]):
            ax.plot(pair.gamma, 100 * pair.error, color=color, lw=0.7, alpha=0.45)
        mean = own.groupby("gamma").error.mean()
        ax.plot(mean.index, 100 * mean.values, color=color, lw=2.5, label="mean over pairs")
        ax.set(title=LABELS[start], xticks=[0, 1], xticklabels=["θ*_πi", "θ*_πj"], xlabel="γ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test error (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over pairs per start, in % (error points)."""
    cols = ["endpoint_error", "max_error", "barrier_linear", "barrier_mean"]
    long = table.assign(endpoint_error=(table.error_i + table.error_j) / 2)
    out = long.groupby("start")[cols].agg(["mean", "std"]) * 100
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    return out.assign(pairs=long.groupby("start").size()).reset_index()


@main_guard
def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir) if args.output_dir else None
    if args.report_only:
        curves, table = pd.read_csv(out / "lmc_curves.csv"), pd.read_csv(out / "lmc_table.csv")
        plot(curves, out / "lmc.png", f"LMC, {out.name}")
        print(markdown_table(summarize(table).set_index("start")))
        return 0 if not args.push_to_hub or push_tables(out, OUTPUTS, args.push_to_hub, new_run_id(out.name), "lmc",
                                                        args.hub_private, "lmc.py") else 1
    student, data, trainer, out, run_id = setup_run(args, "lmc")
    check_range("--bn-subset", args.bn_subset, 1, len(data.train))
    name, accelerator, normalize = Path(data.name).name, trainer.accelerator, trainer.normalize

    # ---- K copies per start
    preempt = PreemptionSignal()
    finals = {}
    try:
        for start in args.starts:
            finals[start] = train_copies(trainer, start_state(start, student, args, data.num_classes), args,
                                         out / start, preempt)
            if finals[start] is None:
                return preempt.exit_status()
    finally:
        preempt.restore()

    # ---- every pair along the segment; the BN subset is the same for every point, pair and start
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.bn_seed))[:args.bn_subset]
    bn_images = data.train.images[pick].to(accelerator.device)
    gammas = torch.linspace(0, 1, args.gammas, dtype=torch.float64).tolist()
    probe = copy.deepcopy(trainer.raw)
    curve_rows, pair_rows = [], []
    seeds = list(range(args.data_seed, args.data_seed + args.copies))
    for start, states in finals.items():
        for (i, a), (j, b) in itertools.combinations(zip(seeds, states), 2):
            points = tqdm(gammas, desc=f"{start} pair {i}-{j}", leave=False, disable=not accelerator.is_main_process)
            errors = error_along_path(probe, a, b, points, trainer.evaluate, args.bn, bn_images, normalize,
                                      args.bn_batch_size)
            curve_rows += [{"start": start, "copy_i": i, "copy_j": j, "gamma": g, "error": e}
                           for g, e in zip(gammas, errors)]
            pair_rows.append({"start": start, "copy_i": i, "copy_j": j, "error_i": errors[0], "error_j": errors[-1],
                              **{("barrier_" + k if k != "max_error" else k): v
                                 for k, v in barriers(gammas, errors).items()}})
    if not accelerator.is_main_process:
        return 0
    curves, table = pd.DataFrame(curve_rows), pd.DataFrame(pair_rows)
    write_table(out / "lmc_curves.csv", curves)
    write_table(out / "lmc_table.csv", table)
    summary = summarize(table)
    write_table(out / "lmc_summary.csv", summary)
    plot(curves, out / "lmc.png", f"LMC on {name}: {student.arch['model']} (width {student.arch['width']:g}), "
                                  f"{args.copies} copies x {args.epochs} epochs, BN {args.bn}")
    print(f"\nTest error along the segment (%, mean over pairs) -> {out}")
    print(markdown_table(summary.set_index("start")))
    if args.push_to_hub and not push_tables(out, OUTPUTS, args.push_to_hub, run_id, "lmc", args.hub_private, "lmc.py"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
