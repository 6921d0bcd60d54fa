"""The one validation layer of the scripts: flag types that check ranges, help that shows every default, output
folders checked before any data is decoded, and the one-line error path.

Imports nothing heavy: scripts parse and check their flags with this module before they import torch, so a bad
flag is reported in well under a second. Exit codes: 2 bad input (one line naming the flag or file, nothing on
disk changed), 3 a run that failed (diverged), 1 a failed Hub push or an unwritable file.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import tempfile
from pathlib import Path

from utils.choices import BUILT_IN, MIN_IMAGE_SIZE

EXIT_USAGE, EXIT_FAILED = 2, 3


class UsageError(Exception):
    """Bad user input. Scripts print it as one line naming the flag and exit with status 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")
        self.flag = flag


class RunFailed(Exception):
    """A run that cannot go on (e.g. it diverged). Printed as one line; exit status 3."""


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to every option that has a default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS) or "(default" in text
                or isinstance(action, argparse._HelpAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".replace("%", "%%").strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (`error: argument --x: ...`) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def main_guard(main):
    """Run `main`, turning known failures into one line on stderr and an exit status (no traceback)."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        except RunFailed as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_FAILED) from None
        except OSError as err:  # a file-system refusal (disk full, permissions): say which file, keep the rest
            if err.filename is None:
                raise
            print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapped


# ------------------------------------------------------------------------------------------ flag types
def _number(kind, low=None, high=None, low_open=False):
    """An argparse `type=` that parses `kind` and checks the range, so a bad value is rejected while parsing."""
    bounds = " and ".join(filter(None, [low is not None and f"{'>' if low_open else '>='} {low:g}",
                                        high is not None and f"<= {high:g}"]))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def count(low: int = 1, high: int | None = None):
    """Integer flag in [low, high]."""
    return _number(int, low, high)


def positive(text: str) -> float:
    """Float flag > 0 (learning rates, temperatures, scales)."""
    return _number(float, 0.0, low_open=True)(text)


def non_negative(text: str) -> float:
    """Float flag >= 0 (weight decays)."""
    return _number(float, 0.0)(text)


def fraction(text: str) -> float:
    """Float flag in [0, 1]."""
    return _number(float, 0.0, 1.0)(text)


def check_range(flag: str, value, low=None, high=None, integer_min=None):
    """For values whose bounds are known only at run time (e.g. the size of the loaded dataset)."""
    if low is not None and high is not None and not low <= value <= high:
        raise UsageError(flag, f"must be in [{low}, {high}], got {value}")
    if integer_min is not None and value < integer_min:
        raise UsageError(flag, f"must be >= {integer_min}, got {value}")
    return value


# ------------------------------------------------------------------------------------- shared flag groups
def add_data_args(p: argparse.ArgumentParser, default_dataset: str | None = "digits", inherited: bool = False):
    """The dataset flags; returns the group so a script adds its own data flags to it. `inherited`: the defaults
    come from the run being probed (probe.py), so the help says so."""
    run = "the run's value on its own dataset, else " if inherited else ""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default_dataset,
                   help=("the run's dataset, else required. " if inherited else "") +
                        "A built-in name (cifar10, cifar100, stl10, tinyimagenet; offline: digits, photos), any "
                        "Hub dataset id, or a local folder (parquet, imagefolder, or save_to_disk)")
    g.add_argument("--image-column", help=f"image column (default: {run}the registry's, else the first Image "
                                          "column)")
    g.add_argument("--label-column", help=f"label column (default: {run}the registry's, else 'label')")
    g.add_argument("--train-split", help=f"split used for training and probe training (default: {run}the "
                                         "registry's, else 'train')")
    g.add_argument("--test-split", help=f"split used for probe evaluation (default: {run}the registry's, else "
                                        "'test')")
    g.add_argument("--revision", help="Hub dataset revision: commit sha, branch or tag (default: the latest)")
    g.add_argument("--image-size", type=count(1), help=f"resize images to this square size in pixels (default: "
                                                       f"{run}the dataset's native size; not for built-in data)")
    g.add_argument("--data-cache", help="where decoded uint8 tensors are cached "
                                        "(default: $RANDOM_TEACHERS_CACHE or ~/.cache/random_teachers)")
    return g


def add_report_args(g) -> None:
    """--report-to and --tracker-project (utils.tracking): live curves of what metrics.csv records."""
    from utils.tracking import TRACKERS, tracker_name

    g.add_argument("--report-to", type=tracker_name, nargs="+", default=["none"], metavar="TRACKER",
                   help="also log metrics.csv's scalars (same steps) and the configuration to these trackers, "
                        f"through Accelerate: none or any of {', '.join(TRACKERS)}; one tracker run per run folder, "
                        "continued on resume (tensorboard: <run folder>/tensorboard)")
    g.add_argument("--tracker-project", default="random-teachers",
                   help="project (experiment) name in the trackers that group runs by project")


# Probe settings and their defaults; probe.py leaves them unset so that a run's own values can fill them.
PROBE_DEFAULTS = {"probe_seed": 0, "probe_epochs": 10, "knn_k": 20, "knn_metric": "l2", "probe_standardized": False}


def add_probe_args(p: argparse.ArgumentParser, inherited: bool = False):
    """The linear / k-NN probe flags; returns the group. With `inherited` (probe.py) they are left unset, to be
    filled from the probed run's config, else PROBE_DEFAULTS (`fill_probe_defaults`); the help says so."""
    g = p.add_argument_group("probing (linear and k-NN probes on the encoder's eval-mode features)")

    def add(flag, text, **kwargs):
        default = PROBE_DEFAULTS[flag[2:].replace("-", "_")]
        if inherited:
            shown = {False: "off", True: "on"}[default] if isinstance(default, bool) else default
            kwargs |= {"default": None, "help": f"{text} (default: the run's value, else {shown})"}
        g.add_argument(flag, **({"default": default, "help": text} | kwargs))

    add("--probe-seed", "seed of the linear probe's init and batch order", type=int)
    add("--probe-epochs", "epochs of the linear probe (the paper's: 10)", type=count(1))
    add("--knn-k", "neighbours of the k-NN probe (the paper's: 20)", type=count(1))
    add("--knn-metric", "l2: Euclidean distance, majority vote (the paper's); cosine: DINO-style exp(sim/0.07) "
                        "weighting", choices=("l2", "cosine"))
    add("--probe-standardized", "also probe features standardised with the probe-train mean/std",
        action=argparse.BooleanOptionalAction)
    g.add_argument("--probe-batch-size", type=count(1), default=512,
                   help="images per forward pass when extracting features (results do not depend on it)")
    return g


def check_knn_k(k: int, n_train: int, subset_flag: str) -> None:
    """The k-NN probe votes among its training images: k beyond their number would silently use them all."""
    if k > n_train:
        raise UsageError("--knn-k", f"{k} neighbours, but the probes train on {n_train} images (set by the dataset "
                                    f"and {subset_flag}); use at most {n_train}")


def fill_probe_defaults(args, run_config: dict | None) -> list[str]:
    """Fill unset probe flags from the run's config, else PROBE_DEFAULTS; return the `flag=value` taken from
    the run (for a one-line note)."""
    taken = []
    for key, default in PROBE_DEFAULTS.items():
        if getattr(args, key) is None:
            value = (run_config or {}).get(key, default)
            setattr(args, key, value)
            if value != default:
                taken.append(f"--{key.replace('_', '-')}={value}")
    return taken


# Data settings of a run that a script working on its student reuses on the run's own dataset (unless a flag
# overrides them): the same images, decoded the same way.
RUN_DATA_SETTINGS = ("image_column", "label_column", "train_split", "test_split", "revision", "image_size")


def reuse_run_settings(args, run_config: dict | None, extra: tuple[str, ...] = ()) -> list[str]:
    """Fill unset flags from the run the student came from: its dataset, its data settings (plus `extra`) when
    working on its own dataset, its probe settings always (so its probes are reproduced). Returns the
    `--flag=value` taken from it, for a one-line note."""
    run_config = run_config or {}
    args.dataset = args.dataset or run_config.get("dataset")
    if args.dataset is None:
        raise UsageError("--dataset", "required when the student is not a run folder")
    taken = []
    if args.dataset == run_config.get("dataset"):
        for key in RUN_DATA_SETTINGS + extra:
            if getattr(args, key) is None and run_config.get(key) not in (None, 0):
                setattr(args, key, run_config[key])
                taken.append(f"--{key.replace('_', '-')}={run_config[key]}")
    return taken + fill_probe_defaults(args, run_config)


# ----------------------------------------------------------------------------------------- output folders
def check_image_size(dataset: str | None, image_size: int | None, model: str, loaded: bool = False) -> None:
    """--image-size must suit the encoder, and built-in datasets have one fixed size. `loaded`: `image_size`
    is that of the decoded dataset (checked again once it is known)."""
    if image_size is None:
        return
    if dataset in BUILT_IN and not loaded:
        raise UsageError("--image-size", f"the built-in {dataset} images are made at 32 x 32; --image-size "
                                         "resizes Hub and local datasets only")
    least = MIN_IMAGE_SIZE[model]
    if image_size < least:
        raise UsageError("--image-size", f"{model} needs images of at least {least} px, " +
                         (f"but {dataset}'s are {image_size} px; pass --image-size {least}" if loaded else
                          f"got {image_size}"))


def writable(folder: Path) -> bool:
    """Whether a file can be created in the existing `folder` (a real attempt: os.access is always true for
    root, and misses read-only mounts and quotas)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def output_problem(path: Path) -> str | None:
    """None if `path` is, or can be created as, a writable folder; else why not. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so {path} cannot be created"
    if not writable(existing):
        return f"{existing} is not writable"
    return None


def check_report_folder(args, what: str) -> None:
    """--output-dir of a script with --report-only: required to report on, and able to hold results otherwise."""
    if args.report_only and not args.output_dir:
        raise UsageError("--output-dir", f"name the {what} folder to report on")
    if args.output_dir and not args.report_only:
        check_output_dir("--output-dir", Path(args.output_dir))


def check_output_dir(flag: str, path: Path) -> Path:
    """Raise a UsageError naming `flag` unless `path` can hold the results; creates nothing."""
    problem = output_problem(path)
    if problem:
        raise UsageError(flag, problem)
    return Path(path)
