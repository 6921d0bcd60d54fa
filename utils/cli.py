"""Flags shared by the scripts, and the one-line error path for bad input."""
from __future__ import annotations

import argparse
import functools
import sys


class UsageError(Exception):
    """Bad user input. Scripts print it as one line naming the flag and exit with status 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")
        self.flag = flag


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (`error: argument --x: ...`) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def main_guard(main):
    """Run `main`, turning UsageError into a one-line message and exit status 2 (no traceback)."""

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped


def add_data_args(p: argparse.ArgumentParser, default_dataset: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default_dataset,
                   help="built-in name (cifar10, cifar100, stl10, tinyimagenet; offline: digits, photos), any Hub "
                        "dataset id, or a local folder (parquet, imagefolder, or save_to_disk)")
    g.add_argument("--image-column", help="image column (default: the registry's, else the first Image column)")
    g.add_argument("--label-column", help="label column (default: the registry's, else 'label')")
    g.add_argument("--train-split", help="split used for training and probe training (default: registry / 'train')")
    g.add_argument("--test-split", help="split used for probe evaluation (default: registry / 'test')")
    g.add_argument("--revision", help="Hub dataset revision (commit sha, branch or tag)")
    g.add_argument("--image-size", type=int, help="resize images to this square size (default: native size)")
    g.add_argument("--data-cache", help="where decoded uint8 tensors are cached "
                                        "(default: $RANDOM_TEACHERS_CACHE or ~/.cache/random_teachers)")


def add_probe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probing (SPEC §3)")
    g.add_argument("--probe-seed", type=int, default=0, help="seed of the linear probe's init and batch order")
    g.add_argument("--probe-epochs", type=int, default=10, help="linear-probe epochs (paper: 10)")
    g.add_argument("--knn-k", type=int, default=20, help="neighbours for the k-NN probe (paper: 20)")
    g.add_argument("--knn-metric", choices=("l2", "cosine"), default="l2",
                   help="l2: Euclidean distance, majority vote (paper); cosine: DINO-style exp(sim/0.07) weighting")
    g.add_argument("--probe-standardized", action="store_true",
                   help="also probe features standardised with the probe-train mean/std")
    g.add_argument("--probe-batch-size", type=int, default=512, help="batch size of feature extraction")


def check_range(flag: str, value, low=None, high=None, integer_min=None):
    if low is not None and high is not None and not low <= value <= high:
        raise UsageError(flag, f"must be in [{low}, {high}], got {value}")
    if integer_min is not None and value < integer_min:
        raise UsageError(flag, f"must be >= {integer_min}, got {value}")
    return value
