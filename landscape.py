#!/usr/bin/env python
"""Loss and probe landscapes on the plane through three networks (paper §5 and App. D.2: Figs. 6, 15-18).

    # Fig. 6, left: teacher, the alpha = 1 student's initialisation, the trained alpha = 1 student
    accelerate launch landscape.py --points runs/A1:teacher runs/A1:init runs/A1:student
    # Fig. 6, right (and Fig. 15 with --coords ortho, Fig. 16 with --zoom 8): teacher, both trained students
    accelerate launch landscape.py --points runs/A0:teacher runs/A0:student runs/A1:student

Each point is a train_distill.py run folder, a save_pretrained folder or a Hub id (the --student loader), with
a selector: `:teacher` (the random teacher rebuilt from its seed), `:init` (the student's initialisation, rebuilt
from its seeds and alpha) or `:student` (the trained student; the default). At every node of the grid and at the
three points themselves: CE and KL to the teacher on fixed train and test subsets, linear and k-NN probes of the
embeddings and ||theta||. Grid points are split across Accelerate processes and written per chunk, so an
interrupted grid resumes where it stopped. Writes landscape.csv (x, y, metric, value), landscape.json (settings,
geometry, timing) and landscape.png to --output-dir. fingerprint.json, written before any evaluation, records each
point's selector and the weights hash of its network and every setting that changes a number; a folder made from
other points or settings is refused (--overwrite replaces it).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from utils.cli import (ArgumentParser, UsageError, add_data_args, add_probe_args, between, bounded, check_output_dir,
                       check_outside_students, check_report_folder, count, main_guard, seed, writing_to)

SELECTORS = ("teacher", "init", "student")
BN_MODES = ("batch", "eval", "recompute", "distill")
OUTPUTS = ("landscape.csv", "landscape.json", "landscape.png")
# Nodes per axis at most (a 501 x 501 grid is already 250k network evaluations), and the largest coordinate: in
# units of the points' distances (affine) or of parameter norm (ortho), far beyond any figure, and small enough
# that theta and its norm stay finite in float32.
MAX_RESOLUTION, MAX_COORDINATE = 501, 1e4


def point_spec(text: str) -> tuple[str, str]:
    """`REF[:selector]` -> (REF, selector); the selector defaults to `student`."""
    ref, _, selector = text.rpartition(":")
    if ref and selector in SELECTORS:
        return ref, selector
    if ref and not Path(text).exists():
        raise UsageError("--points", f"unknown selector {':' + selector!r} in {text!r}; choose from "
                                     f"{', '.join(':' + s for s in SELECTORS)}")
    return text, "student"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Exit status: 0 done, 1 the Hub push or a write failed (disk full), 2 bad input, "
                              "130/143/138 stopped by Ctrl-C/SIGTERM/SIGUSR1 (finished chunks kept: rerun the same "
                              "command to resume).")
    g = p.add_argument_group("plane")
    g.add_argument("--points", nargs=3, metavar="REF[:SEL]", help="the three points (required); the first one's "
                   "run gives the teacher, the dataset and the data settings")
    g.add_argument("--labels", nargs=3, help="names of the points in the figure (default: θ_T, θ_S(α), θ_S*(α))")
    g.add_argument("--coords", choices=("affine", "ortho"), default="affine",
                   help="affine: the points at (0,0), (1,0), (0,1) (Fig. 6); ortho: orthonormal axes, true "
                        "distances, origin at the plane's point closest to 0 (Figs. 15-18)")
    g.add_argument("--scope", choices=("full", "encoder"), default="full",
                   help="parameters the plane moves: the whole network, or the encoder only, with the losses "
                        "between embeddings (Figs. 17-18)")
    a = p.add_argument_group("grid")
    a.add_argument("--resolution", type=count(2, MAX_RESOLUTION), nargs="+", default=[21], metavar="N",
                   help=f"nodes per axis: N, or NX NY (at most {MAX_RESOLUTION})")
    a.add_argument("--x-range", type=bounded(MAX_COORDINATE), nargs=2, metavar=("MIN", "MAX"),
                   help=f"default: fitted to the points (|MIN|, |MAX| <= {MAX_COORDINATE:g})")
    a.add_argument("--y-range", type=bounded(MAX_COORDINATE), nargs=2, metavar=("MIN", "MAX"),
                   help=f"default: fitted to the points (|MIN|, |MAX| <= {MAX_COORDINATE:g})")
    a.add_argument("--margin", type=between(0, 100, low_open=True), default=0.25,
                   help="fitted ranges extend this fraction of the points' extent beyond them on each side")
    a.add_argument("--zoom", type=between(0, 1e6, low_open=True), default=1.0,
                   help="shrink the fitted window by this factor around the point --zoom-on (Figs. 16, 18)")
    a.add_argument("--zoom-on", type=count(0, 2), default=0, help="index of the point to zoom on (0 = first)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--bn", choices=BN_MODES, default="batch",
                   help="BatchNorm at every point, the same for teacher and student, so the teacher is exactly the "
                        "global minimum: batch statistics (as the paper's code), the teacher's buffers (eval), or "
                        "statistics recomputed on the train subset at each point (recompute: probes closest to a "
                        "run's own); or 'distill': as in training (teacher eval, student batch statistics)")
    e.add_argument("--train-images", type=count(1), help="fixed random subset of the train split for the train "
                                                         "losses and the probes' training (default: all)")
    e.add_argument("--test-images", type=count(1), help="fixed random subset of the test split (default: all)")
    e.add_argument("--subset-seed", type=seed, default=0, help="which images form the subsets")
    e.add_argument("--batch-size", type=count(2), help="images per forward pass; with batch statistics it is "
                                                       "part of the function (default: the run's, else 256)")
    e.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast for the forward passes; KL values near 1e-7 need 'no'")
    d = add_data_args(p, default_dataset=None, inherited=True)
    d.description = "the dataset and its settings default to the first point's run"
    add_probe_args(p, inherited=True)
    r = p.add_argument_group("run")
    r.add_argument("--chunk-size", type=count(1), default=4, help="grid points per result file (the unit of "
                                                                   "resuming and of sharing between processes)")
    r.add_argument("--output-dir", help="default: runs/landscape-<first point's name>-<coords>-<hash of the points' "
                                        "weights and selectors>")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a landscape of other points or settings in --output-dir (deleted only once the new "
                        "run is ready; one of the same points and settings is continued, never restarted)")
    r.add_argument("--report-only", action="store_true", help="no evaluation: redraw the figure from the table")
    r.add_argument("--push-to-hub", metavar="REPO", help="upload table, settings and figure to landscape/<id>/")
    r.add_argument("--hub-private", action="store_true")
    args = p.parse_args(argv)
    check_report_folder(args, "landscape", made_by="landscape.csv")
    if args.report_only:
        return args
    if not args.points:
        raise UsageError("--points", "required: three REF[:teacher|init|student]")
    args.specs = [point_spec(t) for t in args.points]
    check_outside_students("--output-dir", args.output_dir, [ref for ref, _ in args.specs], "--points")
    if len(args.resolution) > 2:
        raise UsageError("--resolution", f"give N or NX NY, got {len(args.resolution)} numbers")
    args.resolution = tuple(args.resolution * 2)[:2]
    for flag, given in (("--x-range", args.x_range), ("--y-range", args.y_range)):
        if given is not None and not given[0] < given[1]:
            raise UsageError(flag, f"MIN must be below MAX, got {given[0]:g} {given[1]:g}")
    if args.zoom != 1.0 and args.x_range and args.y_range:
        raise UsageError("--zoom", "zooms the fitted window; with both ranges given, set them directly")
    return args


if __name__ == "__main__":  # torch takes seconds to import: report a bad flag before that
    main_guard(parse_args)()

# ruff: noqa: E402  (the heavy imports below follow the flag check on purpose)
import copy
import json
import time

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from utils import fingerprint
from utils.checkpoint import PreemptionSignal
from utils.cli import check_knn_k, reuse_run_settings
from utils.data import Normalizer, load_dataset
from utils.hub import new_run_id, push_tables, resolve_student
from utils.landscape import (CollinearPoints, Plane, PointEvaluator, flat_parameters, grid_axes, pending_chunks,
                             plot_landscape, read_chunks, work_list, write_chunk)
from utils.results import environment, markdown_table, write_json, write_table


def load_points(specs: list[tuple[str, str]]):
    """The three networks, the first point's student (whose teacher and run define the landscape), its run
    config, default labels, and the weights hash of each point's student (which fixes its teacher and init too)."""
    loaded, networks, labels, hashes = {}, [], [], {}
    for ref, selector in specs:
        if ref not in loaded:
            loaded[ref] = resolve_student(ref, flag="--points")
            hashes[ref] = fingerprint.weights_hash(loaded[ref][0])
        student = loaded[ref][0]
        try:
            net = {"teacher": student.build_teacher, "init": student.build_init, "student": lambda: student}[selector]()
        except ValueError as err:
            raise UsageError("--points", f"{ref}:{selector}: {err}") from None
        alpha = student.seeds["alpha"]
        labels.append({"teacher": "θ_T", "init": "θ_S", "student": "θ_S*"}[selector]
                      + (f"(α={alpha:g})" if selector != "teacher" and alpha is not None else ""))
        networks.append(net.eval())
    for (ref, _), net in zip(specs[1:], networks[1:]):
        if net.arch != networks[0].arch:
            diff = ", ".join(f"{k} {networks[0].arch[k]} vs {net.arch[k]}" for k in net.arch
                             if net.arch[k] != networks[0].arch[k])
            raise UsageError("--points", f"{specs[0][0]} and {ref} have different architectures ({diff})")
    first, run_config = loaded[specs[0][0]]
    try:
        teacher = first.build_teacher()
    except ValueError as err:
        raise UsageError("--points", f"{specs[0][0]}: {err}") from None
    labels = [f"{label} [{k}]" if labels.count(label) > 1 else label for k, label in enumerate(labels)]
    return networks, teacher, run_config, labels, [hashes[ref] for ref, _ in specs]


# Settings that change a number (with the points' weights hashes they make the fingerprint); the others (labels,
# the probes' batch size, --data-cache) change none.
SETTINGS = ("coords", "scope", "resolution", "x_range", "y_range", "margin", "zoom", "zoom_on", "bn", "train_images",
            "test_images", "subset_seed", "batch_size", "mixed_precision", "dataset", "image_column", "label_column",
            "train_split", "test_split", "revision", "image_size", "probe_seed", "probe_epochs", "knn_k", "knn_metric",
            "probe_standardized", "chunk_size")  # chunk_size: finished chunks are reused by their index


def resolved_settings(args, networks, run_config) -> dict:
    """Everything the numbers depend on, as recorded in landscape.json (the fingerprint holds the same)."""
    refs = [str(Path(r).resolve()) if Path(r).exists() else r for r, _ in args.specs]
    return {"points": [[r, s] for r, (_, s) in zip(refs, args.specs)], "arch": networks[0].arch,
            "temps": [(run_config or {}).get("teacher_temp", 1.0), (run_config or {}).get("student_temp", 1.0)],
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in SETTINGS}}


def fingerprint_of(args, hashes: list[str], settings: dict) -> dict:
    dataset = str(Path(args.dataset).resolve()) if Path(args.dataset).exists() else args.dataset
    return {"--points": [[selector, digest] for (_, selector), digest in zip(args.specs, hashes)],
            "--points run's temperatures": settings["temps"], **fingerprint.settings(args, SETTINGS),
            "--dataset": dataset}


def subset(split, n: int | None, seed: int, flag: str, device):
    """A fixed random subset of n images (all of them by default), in index order."""
    if n is not None and n > len(split):
        raise UsageError(flag, f"asked for {n} images but the split has {len(split)}")
    index = torch.arange(len(split)) if n is None else \
        torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    part = split.subset(index).to(device)
    return part.images, part.labels


def tidy(rows: list[dict]) -> pd.DataFrame:
    """One row per (entry, metric): kind (point / grid), label, point index, ix, iy, x, y, metric, value."""
    keys = ("kind", "label", "point", "ix", "iy", "x", "y")
    return pd.DataFrame([{**{k: r[k] for k in keys}, "metric": m, "value": v}
                         for r in rows for m, v in r["metrics"].items()])


def report(out: Path, table: pd.DataFrame, meta: dict) -> None:
    s = meta["settings"]
    title = (f"{Path(s['dataset']).name}: {s['arch']['model']} (width {s['arch']['width']:g}), {s['coords']} plane"
             f"{', encoder only' if s['scope'] == 'encoder' else ''}, BN {s['bn']}, "
             f"{meta['images']['train']} train / {meta['images']['test']} test images")
    plot_landscape(table, meta, out / "landscape.png", title)
    points = table[table.kind == "point"].pivot_table(index="label", columns="metric", values="value", sort=False)
    shown = [c for c in ("train/kl", "test/kl", "linear/test", "knn/test", "linear_std/test", "knn_std/test", "norm")
             if c in points.columns]
    print(f"\nAt the three points ({s['coords']} coordinates {meta['geometry']['points']}) -> {out}")
    print(markdown_table(console_table(points[shown])))


def console_table(points: pd.DataFrame) -> pd.DataFrame:
    """Probe accuracies in % (as every other table), KL in scientific notation (near the teacher it is ~1e-9)."""
    def column(metric: str) -> tuple[str, list[str]]:
        if metric.endswith("/kl"):
            return metric, [f"{v:.3e}" for v in points[metric]]
        if metric == "norm":
            return metric, [f"{v:.6g}" for v in points[metric]]
        return f"{metric} (%)", [f"{100 * v:.2f}" for v in points[metric]]  # a probe's accuracy

    return pd.DataFrame(dict(map(column, points.columns)), index=points.index)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        out = Path(args.output_dir)
        if not (out / "landscape.csv").exists():
            raise UsageError("--output-dir", f"{out} holds no finished landscape (no landscape.csv)")
        meta, table = json.loads((out / "landscape.json").read_text()), pd.read_csv(out / "landscape.csv")
        report(out, table, meta)
        return 0 if not args.push_to_hub or push_tables(out, OUTPUTS, args.push_to_hub, new_run_id(out.name),
                                                        "landscape", args.hub_private, "landscape.py") else 1
    started = time.time()
    networks, teacher, run_config, labels, hashes = load_points(args.specs)
    labels = args.labels or labels
    taken = reuse_run_settings(args, run_config)
    args.batch_size = args.batch_size or (run_config or {}).get("batch_size", 256)
    settings = resolved_settings(args, networks, run_config)
    defines = fingerprint_of(args, hashes, settings)
    tag = hashlib.sha1(json.dumps([defines["--points"], args.coords, args.scope]).encode()).hexdigest()[:8]
    out = Path(args.output_dir or f"runs/landscape-{fingerprint.display_name(args.specs[0][0])}-{args.coords}-{tag}")
    check_output_dir("--output-dir", out)
    owned = [out / name for name in (*OUTPUTS, "chunks")]
    state = fingerprint.check(out, "landscape", defines, args.overwrite, owned)  # changes nothing
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if args.mixed_precision == "no":  # KL near the teacher reaches ~1e-9: no TF32 round-off in convs and matmuls
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if taken:
        accelerator.print(f"using the first point's run settings {' '.join(taken)} (pass a flag to override)")
    with accelerator.main_process_first():
        data = load_dataset(args.dataset, args.image_column, args.label_column, args.train_split, args.test_split,
                            args.revision, args.image_size, args.data_cache)
    device = accelerator.device
    splits = {"train": subset(data.train, args.train_images, args.subset_seed, "--train-images", device),
              "test": subset(data.test, args.test_images, args.subset_seed, "--test-images", device)}
    check_knn_k(args.knn_k, len(splits["train"][1]), "--train-images")

    # ---- the plane, the grid and its chunks (they do not depend on the number of processes)
    vectors = [flat_parameters(net, args.scope).to(device) for net in networks]
    try:
        plane = Plane(vectors, args.coords)
    except CollinearPoints as err:
        raise UsageError("--points", f"{err}: {' '.join(args.points)}") from None
    xs, ys = grid_axes(plane.points.cpu(), args.resolution, args.margin, args.coords == "affine", args.x_range,
                       args.y_range, args.zoom, args.zoom_on)
    work = work_list(labels, plane.points.cpu(), xs, ys)
    chunks = [work[i:i + args.chunk_size] for i in range(0, len(work), args.chunk_size)]
    meta = {"settings": settings, "labels": labels, "coords": args.coords, "xs": xs, "ys": ys,
            "geometry": plane.geometry(), "images": {k: len(v[0]) for k, v in splits.items()},
            "environment": environment()}
    if accelerator.is_main_process:  # ready (points, data and plane checked): only now is anything deleted or written
        writing_to(out)
        if state == "replace":
            fingerprint.discard(out, owned)
        if state != "continue":
            fingerprint.write(out, "landscape", defines, points=[{"ref": ref, "selector": sel, "weights_sha256": h}
                                                                 for (ref, sel), h in zip(args.specs, hashes)])
        write_json(out / "landscape.json", meta)
    accelerator.wait_for_everyone()

    # ---- this process's share of the chunks still missing; a finished chunk is never recomputed
    # the main process lists what is missing, so every process splits the same list
    todo = broadcast_object_list([pending_chunks(out, len(chunks)) if accelerator.is_main_process else None])[0]
    mine = todo[accelerator.process_index::accelerator.num_processes]
    evaluating = time.time()
    if mine:
        model = copy.deepcopy(teacher).to(device)  # buffers are the teacher's; parameters are set per point
        evaluator = PointEvaluator(model, teacher.to(device), args.scope, splits,
                                   Normalizer(data.mean, data.std, device), args.batch_size, args.bn,
                                   tuple(settings["temps"]), data.num_classes, args, accelerator.autocast)
        preempt = PreemptionSignal()
        bar = tqdm(total=sum(len(chunks[i]) for i in mine), desc=f"landscape ({len(todo)}/{len(chunks)} chunks left)",
                   disable=not accelerator.is_main_process)
        try:
            for i in mine:
                rows = []
                for entry in chunks[i]:
                    theta = vectors[entry["point"]] if entry["kind"] == "point" else plane.at([entry["x"], entry["y"]])
                    rows.append({**entry, "metrics": evaluator(theta)})
                    bar.update()
                    if preempt.received:
                        accelerator.print(f"\n{preempt.received} received: the finished chunks are kept in "
                                          f"{out}/chunks; rerun the same command to resume")
                        return preempt.exit_status()
                write_chunk(out, i, rows)
        finally:
            preempt.restore()
            bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0

    # ---- gather every chunk into the table and the figure
    rows = read_chunks(out, len(chunks))
    for row in rows:  # --labels may change on a rerun: the names are drawn, not computed
        row["label"] = labels[row["point"]] if row["kind"] == "point" else ""
    table = tidy(rows)
    evaluated = sum(len(chunks[i]) for i in todo)
    meta["timing"] = {"wall_s": round(time.time() - started, 1), "points_evaluated": evaluated,
                      "evaluation_s": round(time.time() - evaluating, 1), "world_size": accelerator.num_processes,
                      "s_per_point": round((time.time() - evaluating) * accelerator.num_processes / evaluated, 3)
                      if evaluated else None}
    write_table(out / "landscape.csv", table)
    write_json(out / "landscape.json", meta)
    report(out, table, meta)
    if args.push_to_hub and not push_tables(out, OUTPUTS, args.push_to_hub, new_run_id(out.name), "landscape",
                                            args.hub_private, "landscape.py"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
