#!/usr/bin/env python
"""Iterative magnitude pruning with rewinding: are distilled students lottery tickets? (paper §6, Fig. 9)

    accelerate launch imp.py --student runs/distill-cifar10-resnet18-a0-s{0,1,2,3,4} --output-dir runs/imp-fig9
    python imp.py --student runs/digits-student --epochs 4 --lr-milestones 2 3 --rounds 3   # CPU-sized

Two starts from one --student (run folder, save_pretrained folder or Hub id): `student` = the distilled
encoder theta_S* (rewound to itself, l = 0) and `init` = its initialisation theta_S, whose dense run saves
rewind points at epochs l in --rewind-epochs (one dense run per seed serves every l). Each start gets a fresh
linear classifier and the SGD recipe (paper App. C.5). Round 0 trains densely; round r prunes --prune-fraction of the
remaining weights (globally, by magnitude, from round r-1's final weights), rewinds the survivors to the
rewind point and retrains to the end. Finished rounds are skipped and an interrupted one resumes.

Each --student gets a subfolder <name>-<weights hash> of --output-dir holding its rounds and its own
imp_table.csv (one row per seed x start x rewind x round), imp_summary.csv and imp.png; the top of --output-dir
holds the same three aggregated over every (student, seed) run, as the paper's Fig. 9 aggregates over distilled
checkpoints. fingerprint.json records the students' weights hashes and every argument that changes a number;
a folder made by other students or settings is refused (--overwrite replaces it).
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

from utils.cli import (TRAINING_EXIT_STATUS, ArgumentParser, UsageError, add_report_args, check_outside_students,
                       check_report_folder, count, main_guard, open_fraction, seed)
from utils.recipe import SCOPES, STARTS, add_recipe_args, add_student_args, recipe_from_args

OUTPUTS = ("imp_table.csv", "imp_summary.csv", "imp.png")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@", epilog=TRAINING_EXIT_STATUS)
    add_student_args(p)
    i = p.add_argument_group("IMP (paper §6, App. C.5, Fig. 9)")
    i.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS),
                   help="student: theta_S*, rewound to l = 0; init: theta_S, rewound to each --rewind-epochs")
    i.add_argument("--rewind-epochs", type=count(0), nargs="+", default=[0, 1, 2, 5],
                   help="rewind points (epochs of the dense run) of the init start")
    i.add_argument("--rounds", type=count(1, 100), default=15,
                   help="pruning rounds after the dense round 0 (only the dense round: --dense-only)")
    i.add_argument("--prune-fraction", type=open_fraction, default=0.2,
                   help="fraction of the remaining weights pruned per round, in (0, 1)")
    i.add_argument("--prune-scope", choices=SCOPES, default="weights",
                   help="weights: conv and linear weights (default, OpenLTH); all: every parameter (official code)")
    i.add_argument("--no-rewind-optimizer", action="store_true",
                   help="fresh SGD momentum at the rewind point (OpenLTH) instead of the saved one (official code)")
    i.add_argument("--seeds", type=seed, nargs="+", default=[0],
                   help="one IMP run per seed and student: data order and augmentation, and the classifier "
                        "(--head-seed + seed); the summary averages over every (student, seed) run")
    i.add_argument("--dense-only", action="store_true",
                   help="only the dense round 0 and its rewind points (e.g. a Slurm job the pruning jobs wait for)")
    add_recipe_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/imp-<student folder name>-<weights hash>")
    r.add_argument("--overwrite", action="store_true",
                   help="replace results of other students or settings in --output-dir (deleted only once the new "
                        "run is ready; a run of the same students and settings is continued, never restarted)")
    r.add_argument("--report-only", action="store_true",
                   help="no training: rebuild the table and figure from the rounds finished in --output-dir")
    r.add_argument("--push-to-hub", metavar="REPO", help="upload the tables and the figure to imp/<id>/ in REPO")
    r.add_argument("--hub-private", action="store_true")
    add_report_args(r)
    args = p.parse_args(argv)
    args.recipe = recipe_from_args(args)
    for epoch in args.rewind_epochs if "init" in args.starts else []:  # only the init start rewinds to them
        if not 0 <= epoch < args.epochs:
            raise UsageError("--rewind-epochs", f"rewind epoch {epoch} is beyond the run: must be in "
                                                f"[0, --epochs - 1 = {args.epochs - 1}]")
    check_report_folder(args, "IMP", made_by="configs")
    check_outside_students("--output-dir", args.output_dir, args.student)
    return args


if __name__ == "__main__":  # torch takes seconds to import: report a bad flag before that
    main_guard(parse_args)()

# ruff: noqa: E402  (the heavy imports below follow the flag check on purpose)
import pandas as pd

from utils import fingerprint
from utils.checkpoint import PreemptionSignal
from utils.hub import new_run_id, push_tables
from utils.pruning import full_masks, load_masks, prune_round, save_masks, sparsity_report
from utils.results import atomic_path, markdown_table, write_json, write_table
from utils.supervised import Classifier, load_state_file, save_state_file, setup_run, start_encoder

# The arguments of IMP itself that change a number (the recipe's and the data's are added by setup_run).
IMP_SETTINGS = ("prune_fraction", "prune_scope", "no_rewind_optimizer")


# ------------------------------------------------------------------------------------------ the rounds
def rewind_points(start: str, args) -> list[int]:
    return [0] if start == "student" else sorted(set(args.rewind_epochs))


def finish_round(trainer, folder: Path, result: dict, row: dict) -> None:
    """Final weights (the next round's magnitudes), then result.json (the done marker), then drop checkpoints."""
    if trainer.accelerator.is_main_process:
        save_state_file(folder / "final.pt", {"model": trainer.state()["model"]})
        write_json(folder / "result.json", {**row, **result})
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def dense_round(trainer, student, args, seed: int, start: str, base: Path, preempt) -> bool:
    """Round 0: the dense supervised run from the start, saving its rewind points. False if interrupted."""
    folder, acc = base / "round-0", trainer.accelerator
    if (folder / "result.json").exists():
        return True
    trainer.masks = None
    initial = Classifier(start_encoder(student, start), student.embed_dim, trainer.num_classes, args.head_seed + seed)
    trainer.load_state({"model": initial.state_dict()}, optimizer=False)
    wanted = rewind_points(start, args)

    def save_rewind(epoch: int) -> None:
        path = folder / "rewind" / f"epoch-{epoch}.pt"
        if epoch in wanted and acc.is_main_process and not path.exists():
            save_state_file(path, trainer.state(), epoch=epoch)
        acc.wait_for_everyone()

    def fresh_start() -> None:
        # No checkpoint to resume: rewind points on disk are an earlier attempt's (e.g. killed before its first
        # checkpoint), not this run's; kept, a pruned round would rewind to weights of another run than the one
        # whose final weights chose its mask.
        if acc.is_main_process:
            shutil.rmtree(folder / "rewind", ignore_errors=True)
        acc.wait_for_everyone()
        save_rewind(0)

    result = trainer.train(folder, seed, 0, preempt, f"seed {seed} {start} dense", on_epoch_end=save_rewind,
                           on_fresh_start=fresh_start)
    if result is None:
        return False
    finish_round(trainer, folder, result, {"round": 0, "density": 1.0, "start": start, "rewind_epoch": None,
                                           "seed": seed})
    return True


def pruned_rounds(trainer, args, seed: int, start: str, rewind: int, base: Path, preempt) -> bool:
    """Rounds 1..R of one (start, rewind epoch) arm. False if interrupted."""
    arm = base.parent / f"{start}-l{rewind}"
    rewind_file = base / "round-0" / "rewind" / f"epoch-{rewind}.pt"
    if not rewind_file.exists():
        raise UsageError("--rewind-epochs", f"the dense run in {base / 'round-0'} saved no rewind point at epoch "
                                            f"{rewind}; rerun it with this --rewind-epochs in a fresh --output-dir")
    previous, masks = base / "round-0", full_masks(trainer.raw, args.prune_scope)
    for r in range(1, args.rounds + 1):
        folder = arm / f"round-{r}"
        if (folder / "mask.pt").exists():  # masks come from the previous round's final weights: fixed once made
            masks = load_masks(folder / "mask.pt", trainer.accelerator.device)
        else:
            trainer.raw.load_state_dict(load_state_file(previous / "final.pt")["model"])
            masks = prune_round(trainer.raw, masks, args.prune_fraction, r)
            if trainer.accelerator.is_main_process:
                save_masks(folder / "mask.pt", masks)
                write_json(folder / "sparsity.json", sparsity_report(masks))
            trainer.accelerator.wait_for_everyone()
        previous = folder
        if (folder / "result.json").exists():
            continue
        trainer.masks = masks
        trainer.load_state(load_state_file(rewind_file), optimizer=not args.no_rewind_optimizer)
        result = trainer.train(folder, seed, rewind, preempt, f"seed {seed} {start} l={rewind} round {r}")
        if result is None:
            return False
        finish_round(trainer, folder, result, {"round": r, "density": sparsity_report(masks)["density"],
                                               "start": start, "rewind_epoch": rewind, "seed": seed})
    return True


# ------------------------------------------------------------------------------------------- reporting
COLUMNS = ["student", "seed", "start", "rewind_epoch", "round", "weights_remaining", "sparsity", "best_accuracy",
           "final_accuracy", "best_epoch"]


def collect_table(folder: Path, student: str) -> pd.DataFrame:
    """Every finished round of one student's subfolder; the shared dense round 0 of a start appears once per
    rewind arm."""
    rows = []
    for seed_dir in sorted(folder.glob("seed-*")):
        for arm in sorted(p for p in seed_dir.iterdir() if p.is_dir() and "-l" in p.name):
            start, rewind = arm.name.rsplit("-l", 1)
            results = [seed_dir / start / "round-0" / "result.json"] + sorted(arm.glob("round-*/result.json"))
            for path in results:
                if path.exists():
                    rows.append({**pd.read_json(path, typ="series").to_dict(), "rewind_epoch": int(rewind)})
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows).rename(columns={"best": "best_accuracy", "final": "final_accuracy"})
    df["weights_remaining"] = df.density
    df["sparsity"] = 1 - df.density
    df["student"] = student
    return df[COLUMNS].sort_values(["start", "rewind_epoch", "seed", "round"]).reset_index(drop=True)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per (start, rewind epoch, round): mean and sample std (n - 1) over every (student, seed) run, each run
    counting once; `runs` = their number, `students` = distinct students. Accuracies and weights in %."""
    g = table.groupby(["start", "rewind_epoch", "round"])
    out = g.agg(weights_remaining=("weights_remaining", "mean"), runs=("seed", "count"),
                students=("student", "nunique"),
                best_mean=("best_accuracy", "mean"), best_std=("best_accuracy", "std"),
                final_mean=("final_accuracy", "mean"), final_std=("final_accuracy", "std"))
    out[["best_mean", "best_std", "final_mean", "final_std"]] *= 100
    out["weights_remaining"] *= 100
    return out.reset_index()


def label(start: str, rewind: int) -> str:
    return f"student θ_S*, rewind l={rewind}" if start == "student" else f"init θ_S, rewind l={rewind}"


def plot(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Fig. 9: test accuracy vs % of weights remaining (log axis), one line per start / rewind point, mean and
    a ± std band over the (student, seed) runs; best-over-epochs (what the paper plots) and final accuracy side
    by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    blues = plt.get_cmap("Blues")
    for ax, metric in zip(axes, ("best", "final")):
        arms = summary.groupby(["start", "rewind_epoch"])
        for k, ((start, rewind), arm) in enumerate(arms):
            arm = arm.sort_values("round")
            color = "C3" if start == "student" else blues(0.4 + 0.6 * k / max(len(arms) - 1, 1))
            mean, std = arm[f"{metric}_mean"], arm[f"{metric}_std"].fillna(0)
            ax.plot(arm.weights_remaining, mean, "o-", ms=3, color=color, label=label(start, rewind))
            ax.fill_between(arm.weights_remaining, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor_label))
        ax.invert_xaxis()  # sparser to the right, as in the paper
        ax.set(xlabel="weights remaining (%)", title=f"{metric} test accuracy")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def minor_label(value: float, _) -> str:
    """A log axis's minor tick label, left blank next to a power of ten (90 would print over 100's label)."""
    return "" if abs(math.log10(value) - round(math.log10(value))) < 0.05 else f"{value:g}"


def title_of(made: dict, table: pd.DataFrame) -> str:
    d, arch = made["defines"], made["students"][0]["config"]
    runs = table[table["round"] == 0].groupby(["student", "seed"]).ngroups
    return (f"IMP on {Path(d['--dataset']).name}: {arch['model']} (width {arch['width']:g}), {d['--epochs']} "
            f"epochs/round, prune {d['--prune-fraction']:g}/round ({d['--prune-scope']})\n"
            f"mean ± std over {runs} run(s): {table.student.nunique()} student(s) x {table.seed.nunique()} seed(s)")


def write_report(folder: Path, table: pd.DataFrame, made: dict) -> pd.DataFrame:
    summary = summarize(table)
    write_table(folder / "imp_table.csv", table)
    write_table(folder / "imp_summary.csv", summary)
    if len(summary):
        plot(summary, folder / "imp.png", title_of(made, table))
    return summary


def report(out: Path) -> pd.DataFrame:
    """Each student's imp_table.csv, imp_summary.csv and imp.png from its finished rounds, then the same three at
    the top of `out` over every student: the table's rows side by side, the summary over (student, seed) runs."""
    made = fingerprint.read(out)
    if made is None or made.get("kind") != "imp":
        raise UsageError("--output-dir", f"{out} holds no imp.py results (no {fingerprint.FILE} of kind imp)")
    tables = []
    for entry in made["students"]:
        tables.append(collect_table(out / entry["folder"], entry["folder"]))
        write_report(out / entry["folder"], tables[-1], {**made, "students": [entry]})
    return write_report(out, pd.concat(tables, ignore_index=True), made)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir) if args.output_dir else None
    if args.report_only:
        summary = report(out)
        print(markdown_table(summary.set_index("start")))
        return 0 if not args.push_to_hub or push_tables(out, OUTPUTS, args.push_to_hub, new_run_id(out.name), "imp",
                                                        args.hub_private, "imp.py") else 1
    students, data, trainer, out, run_id = setup_run(args, "imp", fingerprint.settings(args, IMP_SETTINGS), OUTPUTS)
    preempt = PreemptionSignal()
    try:
        for student in students:
            for data_seed in args.seeds:
                for start in args.starts:
                    base = out / student.folder / f"seed-{data_seed}" / start
                    if not dense_round(trainer, student.net, args, data_seed, start, base, preempt):
                        return preempt.exit_status()
                    for rewind in ([] if args.dense_only else rewind_points(start, args)):
                        if not pruned_rounds(trainer, args, data_seed, start, rewind, base, preempt):
                            return preempt.exit_status()
    finally:
        preempt.restore()

    if not trainer.accelerator.is_main_process:
        return 0
    if args.dense_only:  # no pruned round yet: a table now would be empty, not a result
        print(f"\nthe dense round 0 and its rewind points are finished in {out}; the same command without "
              "--dense-only runs the pruning rounds and writes imp_table.csv")
        return 0
    summary = report(out)
    print(f"\nIMP test accuracy (%), mean ± std over {len(students)} student(s) x {len(args.seeds)} seed(s) -> {out}")
    print(markdown_table(summary.set_index("start")))
    if args.push_to_hub and not push_tables(out, OUTPUTS, args.push_to_hub, run_id, "imp", args.hub_private,
                                            "imp.py"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
