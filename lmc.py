#!/usr/bin/env python
"""Linear mode connectivity of SGD copies trained from one start (paper §6, Fig. 10).

    accelerate launch lmc.py --student runs/distill-cifar10-resnet18-a0-s{0,1,2} --copies 5 --output-dir runs/lmc-fig10
    python lmc.py --student runs/digits-student --epochs 4 --lr-milestones 2 3 --copies 3      # CPU-sized

From each start, K copies are trained with the SGD recipe (paper App. C.5), differing only in their data seed (data
order and augmentation); every pair is evaluated at --gammas evenly spaced points of the segment
(1 - gamma) theta_i + gamma theta_j, with BatchNorm statistics recomputed at every point on a fixed training
subset (default) or interpolated with the weights. Starts: `student` (theta_S*), `init` (its initialisation
theta_S) and `checkpoint` (a supervised checkpoint, e.g. an imp.py rewind point, continued from its epoch).

Each --student gets a subfolder <name>-<weights hash> of --output-dir holding its copies and its own
lmc_table.csv (one row per pair), lmc_curves.csv, lmc_summary.csv and lmc.png; the top of --output-dir holds the
same four over every student, the summary's mean ± std over all (student, pair) rows, as the paper's Fig. 10
aggregates over checkpoints x orderings. fingerprint.json records the students' weights hashes and every
argument that changes a number; a folder made by other students or settings is refused (--overwrite replaces it).
"""
from __future__ import annotations

import copy
import itertools
import shutil
import sys
from pathlib import Path

from utils.cli import (MAX_SEED, TRAINING_EXIT_STATUS, ArgumentParser, UsageError, add_report_args,
                       check_outside_students, check_range, check_report_folder, count, main_guard, seed)
from utils.recipe import BN_MODES, STARTS, add_recipe_args, add_student_args, recipe_from_args

OUTPUTS = ("lmc_table.csv", "lmc_curves.csv", "lmc_summary.csv", "lmc.png")
LABELS = {"student": "start: student θ_S*", "init": "start: initialisation θ_S", "checkpoint": "start: checkpoint"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@", epilog=TRAINING_EXIT_STATUS)
    add_student_args(p)
    m = p.add_argument_group("mode connectivity (paper §6, Fig. 10)")
    m.add_argument("--starts", nargs="+", choices=STARTS + ("checkpoint",), default=list(STARTS),
                   help="the starts to compare, side by side in the figure")
    m.add_argument("--checkpoint", help="start `checkpoint`: a supervised state file (an imp.py rewind point "
                                        "<student>/seed-*/init/round-0/rewind/epoch-L.pt); copies continue from "
                                        "epoch L")
    m.add_argument("--copies", type=count(2, 64), default=5,
                   help="copies per start (2 <= K <= 64), data seeds S .. S+K-1")
    m.add_argument("--data-seed", type=seed, default=0, help="data seed S of the first copy")
    m.add_argument("--gammas", type=count(2, 10_000), default=50,
                   help="evenly spaced points on each segment, ends included")
    m.add_argument("--bn", choices=BN_MODES, default="recompute",
                   help="BatchNorm statistics at each point: recomputed on a fixed training subset, or interpolated")
    m.add_argument("--bn-subset", type=count(1), default=2000, help="training images (un-augmented) for recomputation")
    m.add_argument("--bn-batch-size", type=count(2), default=500, help="images per pass when recomputing BN")
    m.add_argument("--bn-seed", type=seed, default=0, help="which training images form the BN subset")
    add_recipe_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/lmc-<student folder name>-<weights hash>")
    r.add_argument("--overwrite", action="store_true",
                   help="replace results of other students or settings in --output-dir (deleted only once the new "
                        "run is ready; a run of the same students and settings is continued, never restarted)")
    r.add_argument("--report-only", action="store_true", help="no training or interpolation: redraw from the tables")
    r.add_argument("--push-to-hub", metavar="REPO", help="upload the tables and the figure to lmc/<id>/ in REPO")
    r.add_argument("--hub-private", action="store_true")
    add_report_args(r)
    args = p.parse_args(argv)
    args.recipe = recipe_from_args(args)
    if args.data_seed + args.copies - 1 > MAX_SEED:
        raise UsageError("--data-seed", f"the copies' data seeds S .. S+K-1 must stay <= {MAX_SEED}")
    if ("checkpoint" in args.starts) != bool(args.checkpoint):
        raise UsageError("--checkpoint", "give --checkpoint FILE exactly when --starts includes checkpoint")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError("--checkpoint", f"no such file {args.checkpoint!r}")
    if args.checkpoint and args.student and len(args.student) > 1:
        raise UsageError("--checkpoint", "a checkpoint start belongs to one student: give one --student with it")
    check_report_folder(args, "LMC", made_by="lmc_table.csv")
    check_outside_students("--output-dir", args.output_dir, args.student)
    return args


if __name__ == "__main__":  # torch takes seconds to import: report a bad flag before that
    main_guard(parse_args)()

# ruff: noqa: E402  (the heavy imports below follow the flag check on purpose)
import pandas as pd
import torch
from tqdm.auto import tqdm

from utils import fingerprint
from utils.checkpoint import PreemptionSignal
from utils.hub import new_run_id, push_tables
from utils.lmc import barriers, error_along_path
from utils.results import atomic_path, markdown_table, read_json, write_json, write_table
from utils.supervised import (Classifier, check_state_fits, load_state_file, read_supervised_state, save_state_file,
                               setup_run, start_encoder)

# The arguments of LMC itself that change a number (the recipe's and the data's are added by setup_run).
LMC_SETTINGS = ("gammas", "bn", "bn_subset", "bn_batch_size", "bn_seed")


def read_start_checkpoint(args) -> dict | None:
    """The --checkpoint start's state, checked before any work: a supervised state file from before --epochs."""
    if not args.checkpoint:
        return None
    state = read_supervised_state(Path(args.checkpoint), "--checkpoint")
    if state.get("epoch", 0) >= args.epochs:
        raise UsageError("--checkpoint", f"its epoch {state.get('epoch')} is not before --epochs {args.epochs}")
    return state


def start_state(start: str, student, args, num_classes: int, checkpoint: dict | None) -> dict:
    """{model, epoch[, optimizer]} the copies of `start` begin from (all share the same classifier init)."""
    if start == "checkpoint":
        return checkpoint
    net = Classifier(start_encoder(student, start), student.embed_dim, num_classes, args.head_seed)
    return {"model": net.state_dict(), "epoch": 0}


def train_copies(trainer, state: dict, args, folder: Path, preempt) -> list[dict] | None:
    """The K copies of one start (finished ones are skipped); their final states, or None if interrupted."""
    finals = []
    for data_seed in range(args.data_seed, args.data_seed + args.copies):
        copy_dir = folder / f"copy-{data_seed}"
        if not (copy_dir / "result.json").exists():
            for stale in [*folder.glob(f"pair-{data_seed}-*.json"), *folder.glob(f"pair-*-{data_seed}.json")]:
                stale.unlink(missing_ok=True)  # made with an earlier version of this copy
            trainer.load_state(state)  # momentum too when the start is a checkpoint that carries it
            result = trainer.train(copy_dir, data_seed, state.get("epoch", 0), preempt,
                                   f"{folder.name} copy {data_seed}")
            if result is None:
                return None
            if trainer.accelerator.is_main_process:
                save_state_file(copy_dir / "final.pt", {"model": trainer.state()["model"]})
                write_json(copy_dir / "result.json", {"data_seed": data_seed, **result})
                shutil.rmtree(copy_dir / "checkpoints", ignore_errors=True)
            trainer.accelerator.wait_for_everyone()
        finals.append(load_state_file(copy_dir / "final.pt")["model"])
    return finals


def pairs_asked(args) -> set:
    seeds = range(args.data_seed, args.data_seed + args.copies)
    return {(start, i, j) for start in args.starts for i, j in itertools.combinations(seeds, 2)}


def interpolate_pairs(trainer, finals: dict, args, bn_images, folder: Path,
                      preempt) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Test error along the segment of every pair of copies of each start: (curves, one row per pair), or None if
    a signal came. Each finished pair is kept in <start>/pair-i-j.json (the folder's fingerprint fixes the points
    and the BN settings), so an interrupted run, or one that adds a start, evaluates only the missing pairs."""
    accelerator, student = trainer.accelerator, folder.name
    gammas = torch.linspace(0, 1, args.gammas, dtype=torch.float64).tolist()
    probe = copy.deepcopy(trainer.raw)
    curve_rows, pair_rows = [], []
    seeds = list(range(args.data_seed, args.data_seed + args.copies))
    for start, states in finals.items():
        for (i, a), (j, b) in itertools.combinations(zip(seeds, states), 2):
            if preempt.received:
                return None
            done = folder / start / f"pair-{i}-{j}.json"
            saved = read_json(done)
            errors = saved.get("errors") if isinstance(saved, dict) and saved.get("gammas") == gammas else None
            if errors is None:  # not evaluated yet, or a file damaged by hand: evaluate the pair (again)
                points = tqdm(gammas, desc=f"{student} {start} pair {i}-{j}", leave=False,
                              disable=not accelerator.is_main_process)
                errors = error_along_path(probe, a, b, points, trainer.evaluate, args.bn, bn_images,
                                          trainer.normalize, args.bn_batch_size)
                if accelerator.is_main_process:
                    write_json(done, {"gammas": gammas, "errors": errors})
                accelerator.wait_for_everyone()  # every rank sees the same finished pairs
            curve_rows += [{"student": student, "start": start, "copy_i": i, "copy_j": j, "gamma": g, "error": e}
                           for g, e in zip(gammas, errors)]
            pair_rows.append({"student": student, "start": start, "copy_i": i, "copy_j": j, "error_i": errors[0],
                              "error_j": errors[-1], **{("barrier_" + k if k != "max_error" else k): v
                                                        for k, v in barriers(gammas, errors).items()}})
    return pd.DataFrame(curve_rows), pd.DataFrame(pair_rows)


def plot(curves: pd.DataFrame, path: Path, title: str) -> None:
    """Fig. 10: test error along gamma, a thin line per pair (of every student) and their mean in bold with a
    ± std band, one panel per start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = list(dict.fromkeys(curves.start))
    fig, axes = plt.subplots(1, len(starts), figsize=(4.4 * len(starts), 3.6), sharey=True, squeeze=False)
    for ax, start, color in zip(axes[0], starts, ("C0", "C3", "C2")):
        own = curves[curves.start == start]
        for _, pair in own.groupby(["student", "copy_i", "copy_j"]):
            ax.plot(pair.gamma, 100 * pair.error, color=color, lw=0.7, alpha=0.45)
        by_gamma = own.groupby("gamma").error
        mean, std = 100 * by_gamma.mean(), 100 * by_gamma.std().fillna(0)
        ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        ax.plot(mean.index, mean.values, color=color, lw=2.5, label="mean ± std over pairs")
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
    """Per start: mean and sample std (n - 1) over every (student, pair) row, each pair counting once; `pairs` =
    their number, `students` = distinct students. In % (error points)."""
    cols = ["endpoint_error", "max_error", "barrier_linear", "barrier_mean"]
    long = table.assign(endpoint_error=(table.error_i + table.error_j) / 2)
    out = long.groupby("start", sort=False)[cols].agg(["mean", "std"]) * 100
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    g = long.groupby("start", sort=False)
    return out.assign(pairs=g.size(), students=g.student.nunique()).reset_index()


def title_of(made: dict, table: pd.DataFrame) -> str:
    d, arch = made["defines"], made["students"][0]["config"]
    return (f"LMC on {Path(d['--dataset']).name}: {arch['model']} (width {arch['width']:g}), {d['--epochs']} epochs, "
            f"BN {d['--bn']}\n{table.student.nunique()} student(s), {len(table)} pair(s)")


def write_report(folder: Path, curves: pd.DataFrame, table: pd.DataFrame, made: dict) -> pd.DataFrame:
    summary = summarize(table)
    write_table(folder / "lmc_curves.csv", curves)
    write_table(folder / "lmc_table.csv", table)
    write_table(folder / "lmc_summary.csv", summary)
    plot(curves, folder / "lmc.png", title_of(made, table))
    return summary


def report(out: Path) -> pd.DataFrame:
    """The top-level lmc_table.csv, lmc_curves.csv, lmc_summary.csv and lmc.png from every student's tables."""
    made = fingerprint.read(out)
    if made is None or made.get("kind") != "lmc":
        raise UsageError("--output-dir", f"{out} holds no lmc.py results (no {fingerprint.FILE} of kind lmc)")
    folders = [out / s["folder"] for s in made["students"] if (out / s["folder"] / "lmc_table.csv").exists()]
    if not folders:
        raise UsageError("--output-dir", f"{out} holds no finished student yet (no lmc_table.csv)")
    curves = pd.concat([pd.read_csv(f / "lmc_curves.csv") for f in folders], ignore_index=True)
    table = pd.concat([pd.read_csv(f / "lmc_table.csv") for f in folders], ignore_index=True)
    return write_report(out, curves, table, made)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir) if args.output_dir else None
    if args.report_only:
        print(markdown_table(report(out).set_index("start")))
        return 0 if not args.push_to_hub or push_tables(out, OUTPUTS, args.push_to_hub, new_run_id(out.name), "lmc",
                                                        args.hub_private, "lmc.py") else 1
    defines = {**fingerprint.settings(args, LMC_SETTINGS),
               "--checkpoint": fingerprint.file_hash(Path(args.checkpoint)) if args.checkpoint else None}
    checkpoint = read_start_checkpoint(args)

    def check(students, data, trainer):  # before anything is deleted or written: a refused command changes nothing
        check_range("--bn-subset", args.bn_subset, 1, len(data.train))
        if checkpoint is not None:
            check_state_fits(checkpoint, trainer.raw, Path(args.checkpoint), "--checkpoint")

    students, data, trainer, out, run_id = setup_run(args, "lmc", defines, OUTPUTS, check)
    accelerator = trainer.accelerator
    # the BN subset is the same for every point, pair, start and student
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.bn_seed))[:args.bn_subset]
    bn_images = data.train.images[pick].to(accelerator.device)

    preempt = PreemptionSignal()
    try:
        for student in students:
            folder = out / student.folder
            done = folder / "lmc_table.csv"
            if done.exists() and set(map(tuple, pd.read_csv(done)[["start", "copy_i", "copy_j"]].values)) == \
                    pairs_asked(args):
                continue  # these copies and pairs are finished, under the same fingerprint
            # ---- K copies per start, then every pair along the segment
            finals = {}
            for start in args.starts:
                finals[start] = train_copies(trainer, start_state(start, student.net, args, data.num_classes, checkpoint), args,
                                             folder / start, preempt)
                if finals[start] is None:
                    return preempt.exit_status()
            pairs = interpolate_pairs(trainer, finals, args, bn_images, folder, preempt)
            if pairs is None:
                return preempt.exit_status()
            curves, table = pairs
            if accelerator.is_main_process:
                write_report(folder, curves, table, {**fingerprint.read(out), "students": [
                    {"config": student.net.config()}]})
            accelerator.wait_for_everyone()
    finally:
        preempt.restore()
    if not accelerator.is_main_process:
        return 0
    summary = report(out)
    print(f"\nTest error along the segment (%), mean ± std over {len(students)} student(s) x pairs -> {out}")
    print(markdown_table(summary.set_index("start")))
    if args.push_to_hub and not push_tables(out, OUTPUTS, args.push_to_hub, run_id, "lmc", args.hub_private, "lmc.py"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
