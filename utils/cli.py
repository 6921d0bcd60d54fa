"""The one validation layer of the scripts: flag types that check ranges, help that shows every default, output
folders checked before any data is decoded, and the one-line error path.

Imports nothing heavy: scripts parse and check their flags with this module before they import torch, so a bad
flag is reported in well under a second. Exit codes: 2 bad input (one line naming the flag or file, nothing on
disk changed), 3 a run that failed (diverged), 1 a failed Hub push or an unwritable file (disk full, read-only),
130 Ctrl-C (SIGINT), 143 / 138 SIGTERM / SIGUSR1 (after a checkpoint where the script trains).
"""
from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import sys
import tempfile
from pathlib import Path

from utils.choices import BUILT_IN, MIN_IMAGE_SIZE

EXIT_USAGE, EXIT_FAILED, EXIT_UNWRITABLE, EXIT_SIGINT = 2, 3, 1, 130
# The largest seed a flag takes: seeds are combined (seed * 1_000_003 + epoch + a salt) before torch's manual_seed,
# which takes at most 2**64 - 1, so the bound leaves room for that arithmetic.
MAX_SEED = 2**32 - 1


# The --help epilog of the scripts that train (imp.py, lmc.py).
TRAINING_EXIT_STATUS = ("Exit status: 0 done (finished parts are skipped on a rerun), 1 the Hub push or a write "
                        "failed (disk full; finished parts kept), 2 bad input (nothing changed on disk), 3 a run "
                        "diverged (nothing recorded as finished; its last good checkpoint kept), 130/143/138 stopped "
                        "by Ctrl-C/SIGTERM/SIGUSR1 after a checkpoint (rerun the same command to resume).")


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


# ----------------------------------------------------------------------------------- failed writes
# How a write that ran out of room shows when it does not arrive as an OSError: torch.save's zip writer
# ("unexpected pos 576 vs 534"), safetensors ("I/O error: No space left on device (os error 28)").
_WRITE_FAILURE_SIGNS = ("unexpected pos", "No space left", "os error 28", "Disk quota", "file write failed",
                        "PytorchStreamWriter failed")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
_output_folder: list[Path] = []  # the folder the running script writes to (set by check_output_dir)


def write_failure(err: BaseException, path) -> OSError | None:
    """The OSError naming `path` that `err`, raised while writing `path`, amounts to; None when `err` is not a
    failed write (a bug: let it propagate). An OSError that names its own file keeps it."""
    if isinstance(err, OSError):
        if err.filename is not None:
            return err
        if err.errno not in _WRITE_ERRNOS:
            return None
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    if any(sign in str(err) for sign in _WRITE_FAILURE_SIGNS):
        return OSError(errno.ENOSPC, f"the write failed, most likely no space left on device ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:120]})", str(path))
    return None


def writing_to(folder) -> None:
    """Register the folder the script writes its results to: a failed write that names no file is reported as
    a failure to write there."""
    _output_folder[:] = [Path(folder)]


def main_guard(main):
    """Run `main`, turning known failures into one line on stderr and an exit status (no traceback): bad input
    (2), a failed run (3), a failed write (1, naming the file or the output folder), Ctrl-C (130)."""

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
        except KeyboardInterrupt:  # Ctrl-C outside a loop that checkpoints on it: what is finished is on disk
            print("error: interrupted by Ctrl-C (SIGINT); finished results are kept, rerun the same command to "
                  "continue", file=sys.stderr)
            raise SystemExit(EXIT_SIGINT) from None
        except Exception as err:  # a file-system refusal (disk full, read-only, permissions): say where
            if isinstance(err, OSError) and err.filename is not None:
                print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
                raise SystemExit(EXIT_UNWRITABLE) from None
            where = _output_folder[0] if _output_folder else "the output folder"
            failure = write_failure(err, where)
            if failure is None:
                if not isinstance(err, OSError):
                    raise
                print(f"error: {err}", file=sys.stderr)  # e.g. a network error: environmental, one line
                raise SystemExit(EXIT_UNWRITABLE) from None
            print(f"error: a write in {failure.filename} failed: {failure.strerror}; finished results are kept",
                  file=sys.stderr)
            raise SystemExit(EXIT_UNWRITABLE) from None

    return wrapped


# ------------------------------------------------------------------------------------------ flag types
def _number(kind, low=None, high=None, low_open=False):
    """An argparse `type=` that parses `kind` and checks the range, so a bad value is rejected while parsing."""
    shown = (lambda v: f"{v:d}") if kind is int else (lambda v: f"{v:g}")  # seeds' bounds in full
    bounds = " and ".join(filter(None, [low is not None and f"{'>' if low_open else '>='} {shown(low)}",
                                        high is not None and f"<= {shown(high)}"]))

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


def open_fraction(text: str) -> float:
    """Float flag in (0, 1), both ends excluded (e.g. the fraction of weights pruned per round)."""
    value = _number(float)(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and < 1, got {text}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, MAX_SEED]."""
    return _number(int, 0, MAX_SEED)(text)


def between(low: float, high: float, low_open: bool = False):
    """Float flag in [low, high] (or (low, high] with `low_open`): an upper bound where a larger value only costs
    memory or overflows."""
    return _number(float, low, high, low_open)


def bounded(limit: float):
    """Float flag in [-limit, limit] (coordinates: values beyond make norms overflow, not a finer picture)."""
    return _number(float, -limit, limit)


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


# ------------------------------------------------------------------------------------------- repetitions
def repetition_seeds(repeat: int) -> dict[str, int]:
    """The seeds of repetition r of an experiment: a new random teacher (2r), a new fresh init mixed into the
    student (2r + 1), a new data order / subset / validation split / noise set (r) and a new linear-probe init
    and batch order (r). Repetition 0 is the scripts' historical defaults (teacher 0, student 1, data 0,
    probe 0), so run folders made before repetitions existed keep their meaning. Teacher and student seeds
    never collide across repetitions (evens vs odds), so no repetition's teacher is another one's fresh init."""
    return {"teacher_seed": 2 * repeat, "student_seed": 2 * repeat + 1, "seed": repeat, "probe_seed": repeat}


REPETITION_RULE = "teacher seed 2R, student seed 2R + 1, data seed (--seed) R, probe seed R"


def apply_repetition(args) -> None:
    """Fill every seed flag left unset (None) from `args.repeat`, so `args` holds the effective seeds (what
    config.json records and resumption compares); a seed given explicitly is kept."""
    for key, value in repetition_seeds(args.repeat).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def add_probe_args(p: argparse.ArgumentParser, inherited: bool = False, repeated: bool = False):
    """The linear / k-NN probe flags; returns the group. With `inherited` (probe.py) they are left unset, to be
    filled from the probed run's config, else PROBE_DEFAULTS (`fill_probe_defaults`); the help says so. With
    `repeated` (train_distill.py) --probe-seed is left unset, to be derived from --repeat (`apply_repetition`)."""
    g = p.add_argument_group("probing (linear and k-NN probes on the encoder's eval-mode features)")

    def add(flag, text, **kwargs):
        default = PROBE_DEFAULTS[flag[2:].replace("-", "_")]
        if repeated and flag == "--probe-seed":
            kwargs |= {"default": None, "help": f"{text} (default: R of --repeat)"}
        if inherited:
            shown = {False: "off", True: "on"}[default] if isinstance(default, bool) else default
            kwargs |= {"default": None, "help": f"{text} (default: the run's value, else {shown})"}
        g.add_argument(flag, **({"default": default, "help": text} | kwargs))

    add("--probe-seed", "seed of the linear probe's init and batch order", type=seed)
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


def check_report_folder(args, what: str, made_by: str | None = None) -> None:
    """--output-dir of a script with --report-only: required to report on, an existing folder holding `made_by`
    (a file or folder only the script writes, so a report never lands in another script's or a student's
    folder); able to hold results otherwise."""
    if args.report_only and not args.output_dir:
        raise UsageError("--output-dir", f"name the {what} folder to report on")
    if args.report_only and made_by:
        out = Path(args.output_dir)
        if not out.is_dir():
            raise UsageError("--output-dir", f"no such folder {str(out)!r} to report on")
        if not (out / made_by).exists():
            raise UsageError("--output-dir", f"{out} holds no {what} results (no {made_by}); name the folder the "
                                             f"{what} run wrote")
        writing_to(out)
    if args.output_dir and not args.report_only:
        check_output_dir("--output-dir", Path(args.output_dir))


def check_output_dir(flag: str, path: Path) -> Path:
    """Raise a UsageError naming `flag` unless `path` can hold the results; creates nothing. Registers `path`
    as the folder a failed write is reported against (`writing_to`)."""
    problem = output_problem(path)
    if problem:
        raise UsageError(flag, problem)
    writing_to(path)
    return Path(path)


def student_folders(ref: str) -> list[Path]:
    """The folders a --student reference occupies on disk: a save_pretrained folder, and the train_distill.py run
    folder it is the student/ of (or that holds it). Empty for a Hub id."""
    path = Path(ref).expanduser()
    if not path.exists():
        return []
    folders = [path.resolve()]
    if (path / "student").is_dir():
        folders.append((path / "student").resolve())
    if path.name == "student" and (path.parent / "config.json").exists():
        folders.append(path.parent.resolve())
    return folders


def check_outside_students(flag: str, output_dir: str | None, refs, student_flag: str = "--student") -> None:
    """Refuse an --output-dir that is a student's folder (or its run folder) or inside one: results written
    there would mix with, or overwrite, the student's own files."""
    if not output_dir:
        return
    out = Path(output_dir).expanduser().resolve()
    for ref in [refs] if isinstance(refs, str) else (refs or []):
        for folder in student_folders(ref):
            if out == folder or folder in out.parents:
                raise UsageError(flag, f"{output_dir} is {'inside ' if out != folder else ''}the folder of "
                                       f"{student_flag} {ref}; results would be written among its files: choose "
                                       "another folder")
