#!/usr/bin/env python
"""Probe a distilled student (and its rebuilt random teacher, and the pixels) on any registered dataset.

    python probe.py --student runs/distill-digits-resnet18-a1e-10-s0              # the dataset it was trained on
    python probe.py --student runs/distill-tinyimagenet-vgg11-a1e-10-s0 --dataset cifar10   # transfer (Tables 2, 4)

`--student` is a run folder, a save_pretrained folder or a Hub model id. Linear and k-NN probes on eval-mode
encoder features (docs/method.md); prints the table and writes probe_table.csv and probe_results.json.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from utils.cli import (ArgumentParser, UsageError, add_data_args, add_probe_args, check_image_size, check_knn_k,
                       check_output_dir, count, main_guard, output_problem, reuse_run_settings)

def parse_args(argv=None):
    """Parse and check every flag (torch-free, so a bad flag is reported before torch is imported)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Exit status: 0 done, 1 the Hub push failed (rerun with --push-only), 2 bad input.")
    s = p.add_argument_group("student")
    s.add_argument("--student", help="run folder, save_pretrained folder or Hub model id (required)")
    s.add_argument("--student-revision", help="Hub revision of the student (default: the latest)")
    s.add_argument("--no-teacher", action="store_true", help="skip the teacher rebuilt from the student's seed")
    s.add_argument("--input", action="store_true", help="also probe the raw pixels")
    d = add_data_args(p, default_dataset=None, inherited=True)
    d.add_argument("--val-size", type=count(0), help="hold out this many training images for validation "
                                                     "(default: the run's value on its dataset, else 0)")
    d.add_argument("--seed", type=count(0), help="seed of the validation split (default: the run's value on its "
                                                 "dataset, else 0)")
    add_probe_args(p, inherited=True)
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help="where to write the table (default: <run>/probes/<dataset> for a run "
                                        "folder, else runs/probe-<student>-<dataset>; a read-only run folder "
                                        "falls back to the latter)")
    h = p.add_argument_group("Hugging Face Hub")
    h.add_argument("--push-to-hub", metavar="REPO", help="upload the probe tables to probes/<id>/ in this repo")
    h.add_argument("--hub-private", action="store_true", help="create the repo as private")
    h.add_argument("--push-only", metavar="PROBE_DIR", help="only (re)try the upload of a probe output folder")
    args = p.parse_args(argv)
    if not args.push_only and not args.student:
        raise UsageError("--student", "required (a run folder, a save_pretrained folder or a Hub model id)")
    if args.output_dir:
        check_output_dir("--output-dir", Path(args.output_dir))
    return args


if __name__ == "__main__":  # torch takes seconds to import: report a bad flag before that
    main_guard(parse_args)()

# ruff: noqa: E402  (the heavy imports below follow the flag check on purpose)
import json
import time

import pandas as pd
import torch
from accelerate import Accelerator

from utils.choices import uses_channels_last
from utils.data import Normalizer, load_dataset, validation_split
from utils.hub import new_run_id, push_or_explain, resolve_student
from utils.probing import extract_features, probe_features
from utils.results import environment, format_table, probe_table, summarize, write_json, write_table


def student_label(ref: str, revision: str | None) -> str:
    """A folder name unique to the student: a local folder's name plus a hash of its absolute path (two
    save_pretrained folders both called `student` never share one), or the Hub id."""
    path = Path(ref).expanduser()
    if path.exists():
        resolved = path.resolve()
        return f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    return ref.replace("/", "--") + (f"@{revision}" if revision else "")


def output_folder(args, run_config: dict | None) -> Path:
    """Checked before anything is computed; a read-only run folder falls back to runs/ (said in one line)."""
    if args.output_dir:
        return Path(args.output_dir)
    name = Path(args.dataset).name
    fallback = Path("runs") / f"probe-{student_label(args.student, args.student_revision)}-{name}"
    if run_config:
        preferred = Path(args.student) / "probes" / name
        problem = output_problem(preferred)
        if problem is None:
            return preferred
        print(f"note: {problem}; writing the probe results to {fallback} instead")
    return check_output_dir("--output-dir", fallback)


def push_only(args) -> int:
    folder = Path(args.push_only)
    if not (folder / "probe_results.json").exists():
        raise UsageError("--push-only", f"{folder} holds no probe results (no probe_results.json)")
    saved = json.loads((folder / "probe_results.json").read_text())
    repo = args.push_to_hub or saved["args"].get("push_to_hub")
    if not repo:
        raise UsageError("--push-to-hub", "name the repo to push to")
    return 0 if push_or_explain(folder, repo, saved["run_id"], args.hub_private, "probe.py") else 1


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.push_only:
        return push_only(args)
    started = time.time()
    accelerator = Accelerator()
    student, run_config = resolve_student(args.student, revision=args.student_revision)
    taken = reuse_run_settings(args, run_config, ("val_size", "seed"))
    args.val_size, args.seed = args.val_size or 0, args.seed or 0
    check_image_size(args.dataset, args.image_size, student.arch["model"])
    out = output_folder(args, run_config)
    if taken:
        accelerator.print(f"probing with the run's settings {' '.join(taken)} (pass a flag to override)")
    dataset = args.dataset
    with accelerator.main_process_first():
        data = load_dataset(dataset, args.image_column, args.label_column, args.train_split, args.test_split,
                            args.revision, args.image_size, args.data_cache)
    check_image_size(dataset, data.image_size, student.arch["model"], loaded=True)
    if data.image_size != student.arch["image_size"]:
        accelerator.print(f"note: the student was trained on {student.arch['image_size']} px images and is probed "
                          f"on {data.image_size} px ones (--image-size changes that)")
    device = accelerator.device
    train_idx, val_idx = validation_split(len(data.train), args.val_size, args.seed) if args.val_size else \
        (torch.arange(len(data.train)), None)
    train = data.train.subset(train_idx).to(device)
    check_knn_k(args.knn_k, len(train), "--val-size")
    evals = {"test": data.test.to(device)} | ({"val": data.train.subset(val_idx).to(device)} if args.val_size else {})
    # the run's memory layout (else train_distill.py's default for the model): conv round-off then matches the
    # run's bit for bit, and so do its probes (a 1e-7 feature difference can flip a k-NN vote)
    channels_last = uses_channels_last((run_config or {}).get("channels_last"), student.arch["model"])
    normalize = Normalizer(data.mean, data.std, device, channels_last)
    layout = torch.channels_last if channels_last else torch.preserve_format

    def probe(subject, encoder):
        def feats(images):
            return extract_features(encoder, len(images), lambda i: normalize(images[i]), args.probe_batch_size,
                                    accelerator, accelerator.autocast)

        sets = {k: (feats(s.images), s.labels) for k, s in evals.items()}
        return probe_features((feats(train.images), train.labels), sets, data.num_classes, args, subject)

    subjects = [("student", student)]
    if not args.no_teacher and student.seeds["teacher_seed"] is not None:
        subjects.append(("teacher", student.build_teacher()))
    results = {}
    for subject, net in subjects:
        results |= probe(subject, net.to(device, memory_format=layout).eval().encoder)
    if args.input:
        results |= probe("input", torch.nn.Flatten())

    name = Path(dataset).name
    rows = [{"epoch": 0, "step": 0, "metric": k, "value": v} for k, v in results.items()]
    table = probe_table(summarize(pd.DataFrame(rows)))
    table = table[[c for c in table.columns if c.endswith("final") or c.endswith("@val")]]
    table.columns = [c.replace(" final", "") for c in table.columns]
    run_id = new_run_id(f"{Path(args.student).name}-{name}")
    if accelerator.is_main_process:
        write_table(out / "probe_table.csv", table.reset_index())
        write_json(out / "probe_results.json", {"student": args.student, "dataset": dataset, "results": results,
                                                "run_id": run_id,
                                                "args": vars(args), "environment": environment(),
                                                "wall_time_s": round(time.time() - started, 1)})
        print(f"Probe accuracy (%) of {args.student} on {dataset} -> {out}")
        print(format_table(table))
        if args.push_to_hub and not push_or_explain(out, args.push_to_hub, run_id, args.hub_private, "probe.py"):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
