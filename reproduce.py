#!/usr/bin/env python
"""Reproduce a table or figure of the paper with one command: run its grid, see its status, aggregate its report.

    python reproduce.py run fig4 --tiny            # the digits version, one point after another, on this machine
    python reproduce.py run table1 --slurm         # submit the grid as a Slurm job array (one task per point)
    python reproduce.py status fig4 --tiny
    python reproduce.py report fig4 --tiny         # runs/reproduce/fig4-tiny/report.{md,csv,png}

Grids live in accelerate_configs/experiments/<name>.yaml. Every point is a train_distill.py run folder with a
stable name: finished points are skipped, interrupted ones resume from their checkpoints, failed ones rerun.
Each cell is repeated over `--repeat` (3 repetitions, each with its own random teacher, student init, data order
and probe seed); `report` gives mean ± std and n across them, with the paper's numbers beside them.

Grids of imp.py, lmc.py and landscape.py (Figs. 6, 9, 10, 15-18) consume the students of the distillation grid they
name (`students_of`). `run` first runs the students that are not finished (only the points it needs), then its
own points; with `--point` it runs nothing of the other grid and refuses until those students are finished.
`--slurm` submits the needed unfinished students as an array of their grid and this grid's array with
`--dependency=afterok` on it. `status` shows a point whose students are not finished as waiting.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from utils.cli import ArgumentParser, UsageError, check_output_dir, count, main_guard
from utils.costs import method_line, point_cost
from utils.grids import (DEFAULT_SCRIPT, available, commands, finished, load_grid, points, run_dir, same_arguments,
                         shell)
from utils.results import read_config

ROOT = Path(__file__).resolve().parent  # the scripts it runs live here
SLURM_SCRIPT = "accelerate_configs/slurm/reproduce_array.sbatch"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog=f"Grids: {', '.join(available())}. Exit status: 0 every selected point finished, 1 some "
                              "failed (rerun to retry them), 2 bad input, 130/143/138 stopped by Ctrl-C/SIGTERM/"
                              "SIGUSR1 (the running point checkpointed: rerun to resume).")
    p.add_argument("verb", choices=("run", "status", "report"))
    p.add_argument("grid", help="the table or figure (a file name in accelerate_configs/experiments/, or in the "
                                "folder named by $REPRODUCE_GRID_DIR, without .yaml)")
    p.add_argument("--tiny", action="store_true", help="the grid's small digits version (runs on 2 CPU cores)")
    p.add_argument("--runs", default="runs/reproduce", help="where the grids' run folders live")
    p.add_argument("--point", type=count(0), help="only this point (0-based; a Slurm array task id)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands and their derived GPU-hours (a low-high range), run nothing")
    p.add_argument("--slurm", action="store_true", help=f"submit the grid as a Slurm job array ({SLURM_SCRIPT})")
    p.add_argument("--launcher", default=None,
                   help="what runs each script instead of this Python, e.g. 'accelerate launch --num_processes 8'")
    p.add_argument("--hub", metavar="REPO", help="report: read the runs pushed to this Hub repo instead of --runs")
    return p.parse_args(argv)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # Slurm's two, and Ctrl-C


def call_forwarding_signals(cmd: list[str]) -> int:
    """Run one point's command; SIGTERM / SIGUSR1 (Slurm's) and SIGINT (Ctrl-C) are passed on, so a training run
    checkpoints before it stops. Returns the child's status, or 128 + the signal if one arrived (then nothing more
    is started). The child has a process group of its own: a terminal's Ctrl-C, sent to the whole foreground
    group, reaches it once, through this forwarding, rather than twice."""
    child, received = None, []

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    child = subprocess.Popen(cmd, cwd=ROOT, process_group=0)
    if received:  # arrived while the child was being started
        child.send_signal(received[0])
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else status


def waiting_for(spec, pts, runs: Path) -> tuple[dict | None, list]:
    """The distillation grid these points consume and its points they need that are not finished yet."""
    if "students_of" not in spec:
        return None, []
    source = load_grid(spec["students_of"]["grid"], spec["is_tiny"])
    needed = sorted({i for p in pts for i in p.needs})
    source_pts = points(source)
    return source, [source_pts[i] for i in needed if not finished(source_pts[i], run_dir(runs, source, source_pts[i]))]


def print_costs(spec, pts) -> None:
    """The grid's derived GPU-hours as a range, the probing share, and how they were derived."""
    if any(p.script != DEFAULT_SCRIPT for p in pts):  # no FLOP model of IMP / LMC / landscape evaluation yet
        print(f"# total: {len(pts)} {pts[0].script} points; GPU-hours not derived for {pts[0].script} (only "
              "train_distill.py points have a cost model); the students they consume are costed by their own grid")
        return
    costs = [point_cost(p.args, p.probe_on) for p in pts]
    total = sum(costs[1:], costs[0])
    low, high = total.hours()
    print(f"# total: {len(pts)} points, {low:.1f}-{high:.1f} GPU-hours; probing is {total.probe_flop / total.flop:.0%} "
          f"of the FLOPs and {total.probe_steps:,} linear-probe steps")
    if spec.get("runs_of", spec["name"].removesuffix("-tiny")) != spec["name"].removesuffix("-tiny"):
        own = [point_cost(p.args) for p in pts]
        shared_low, shared_high = sum(own[1:], own[0]).hours()
        print(f"# of which {shared_low:.1f}-{shared_high:.1f} GPU-h are the {spec['runs_of']} runs this grid "
              "shares (already done if that grid ran)")
    for precision in sorted({p.args.get("mixed_precision") or "no" for p in pts}):
        print(f"# {method_line(precision)}")


def submit_array(args, grid: str, indices: list[int], after: str | None = None, parsable=False) -> list[str]:
    """sbatch of one grid's array; `after`: a job id whose tasks must all succeed first (else this one is
    cancelled rather than left pending forever)."""
    array = f"0-{indices[-1]}" if indices == list(range(indices[-1] + 1)) else ",".join(map(str, indices))
    wait = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    return ["sbatch", *(["--parsable"] if parsable else []), f"--array={array}", *wait,
            SLURM_SCRIPT, grid, *(["--tiny"] if args.tiny else []), "--runs", args.runs,
            *(["--launcher", args.launcher] if args.launcher else [])]


def slurm(args, spec, pts, waiting) -> int:
    """Submit the grid's array; students not finished yet first, as an array this one waits for (afterok)."""
    after = None
    if waiting:
        first = submit_array(args, spec["students_of"]["grid"], [p.index for p in waiting], parsable=True)
        if args.dry_run:  # as a shell would run it
            print(f"STUDENTS_JOB=$({shell(first)})")
            after = "$STUDENTS_JOB"
        else:
            print(shell(first))
            done = subprocess.run(first, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr.strip(), file=sys.stderr)
                return done.returncode
            after = done.stdout.strip().split(";")[0]  # --parsable: "jobid[;cluster]"
            print(f"submitted the students' array {after}")
    submit = submit_array(args, args.grid, [p.index for p in pts], after)
    print(shell(submit).replace("'--dependency=afterok:$STUDENTS_JOB'", '--dependency=afterok:"$STUDENTS_JOB"'))
    return 0 if args.dry_run else subprocess.call(submit)


def run(args, spec, pts) -> int:
    source, waiting = waiting_for(spec, pts, Path(args.runs))
    if args.slurm:
        return slurm(args, spec, pts, waiting)
    names = ", ".join(str(p.index) for p in waiting)
    if waiting and args.dry_run:
        print(f"# {spec['name']} consumes {source['name']} points {names}, not finished: `run` runs them first")
    if waiting and not args.dry_run:
        if args.point is not None:  # array tasks run side by side: never train another grid's points here
            raise UsageError("--point", f"point {args.point} of {spec['name']} waits for {source['name']} points "
                                        f"{names} (not finished): run `python reproduce.py run "
                                        f"{spec['students_of']['grid']}{' --tiny' if args.tiny else ''}` first")
        print(f"{spec['name']} consumes {source['name']} points {names}, not finished: running them first", flush=True)
        status = run_points(args, source, waiting)
        if status != 0:
            print(f"the students of {spec['name']} did not all finish; its points were not started")
            return status
    return run_points(args, spec, pts)


def run_points(args, spec, pts) -> int:
    launcher = args.launcher.split() if args.launcher else None
    failed, total = [], len(points(spec))
    for point in pts:
        folder = run_dir(Path(args.runs), spec, point)
        cmds = commands(point, folder if args.dry_run else folder.resolve(), launcher)
        if args.dry_run:
            if point.script == DEFAULT_SCRIPT:
                low, high = point_cost(point.args, point.probe_on).hours()
                print(f"# point {point.index}: {point.name} (derived: {low:.2f}-{high:.2f} GPU-h)")
            else:
                print(f"# point {point.index}: {point.name} (cost not derived; needs {spec['students_of']['grid']} "
                      f"points {', '.join(map(str, point.needs))})")
            print("\n".join(shell(["python", *c[1:]] if c[0] == sys.executable else c) for c in cmds))
            continue
        if finished(point, folder):
            print(f"[{point.index + 1}/{total}] {point.name}: finished, skipped")
            continue
        if point.script == DEFAULT_SCRIPT and (folder / "summary.json").exists() and \
                not same_arguments(point, read_config(folder) or {}):
            print(f"[{point.index + 1}/{total}] {point.name}: {folder} holds a finished run of other arguments "
                  "(the grid file changed?); delete it to rerun the point")
            failed.append(point.name)
            continue
        print(f"[{point.index + 1}/{total}] {point.name}", flush=True)
        for cmd in cmds:
            status = call_forwarding_signals(cmd)
            if status in [128 + sig for sig in STOP_SIGNALS]:  # checkpointed: stop, resume on rerun
                print(f"{point.name} stopped after a checkpoint; rerun the same command to resume")
                return status
            if status != 0:
                failed.append(point.name)
                break
    if args.dry_run:
        print_costs(spec, pts)
        return 0
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return 1 if failed else 0


def status(args, spec, pts) -> int:
    source, waiting = waiting_for(spec, pts, Path(args.runs))
    missing = {p.index for p in waiting}
    done = [p for p in pts if finished(p, run_dir(Path(args.runs), spec, p))]
    for p in pts:
        folder = run_dir(Path(args.runs), spec, p)
        late = [i for i in p.needs if i in missing]
        state = "finished" if p in done else "waiting" if late else (
            "interrupted" if (folder / "checkpoints").is_dir() or (folder / "fingerprint.json").exists() else "to do")
        print(f"{p.index:4d}  {state:11s}  {p.name}" + (f"  (for {source['name']} points {', '.join(map(str, late))})"
                                                         if late and p not in done else ""))
    print(f"{len(done)}/{len(pts)} finished")
    return 0


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.verb == "run" and not args.dry_run:
        check_output_dir("--runs", Path(args.runs))
    spec = load_grid(args.grid, args.tiny)
    pts = points(spec)
    if args.point is not None:
        if args.point >= len(pts):
            raise UsageError("--point", f"{args.grid} has {len(pts)} points (0-{len(pts) - 1}), got {args.point}")
        pts = [pts[args.point]]
    if args.verb == "run":
        return run(args, spec, pts)
    if args.verb == "status":
        return status(args, spec, pts)
    if spec["report"]["kind"] in ("imp", "lmc", "landscape"):
        if args.hub:
            raise UsageError("--hub", f"{spec['name']} is a {pts[0].script} grid: its report reads --runs (the script "
                                      "pushes its own tables and figure with --push-to-hub)")
        from utils.aggregate import collect_figures  # pandas + matplotlib: only for reports

        md = collect_figures(spec, pts, Path(args.runs))
        print(md.read_text())
        print(f"-> {md.parent}/report.md")
        return 0
    from utils.aggregate import collect, collect_curves, report  # pandas + matplotlib: only for reports

    hub_folder = None
    if args.hub:
        from utils.hub import hub_snapshot

        hub_folder = hub_snapshot(args.hub, ["runs/*/config.json", "runs/*/summary.json"])
    frame = collect(spec, pts, Path(args.runs), hub_folder)
    if frame.empty:
        raise UsageError("grid", f"no finished point of {spec['name']} in {args.hub or args.runs}; run it first")
    curves = collect_curves(spec, pts, Path(args.runs)) if spec["report"]["kind"] == "curve" else None
    md = report(spec, frame, Path(args.runs) / spec["name"], curves)
    print(md.read_text())
    print(f"-> {md.parent}/report.{{md,csv,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
