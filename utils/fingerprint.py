"""What defines a run folder's results, written into it before any work and checked on every rerun.

imp.py, lmc.py and landscape.py continue whatever an earlier invocation left in their --output-dir (finished
rounds, copies or grid chunks are skipped, an interrupted one resumes). That is only right if the earlier
invocation computed the same numbers, so each writes `fingerprint.json` first: the weights hash of every
network it starts from and the value of every argument that changes a number. A rerun whose fingerprint
differs is refused with one line naming the first difference; nothing in the folder changes. With --overwrite
the old results are deleted, but only once the new run is ready to start (its networks and data loaded), the
same rule as train_distill.py. A rerun with the same fingerprint always continues, --overwrite or not:
continuing is exact, so it ends where starting over would, and a requeued --overwrite job must not restart.

Arguments that only choose *which* units of work run (IMP's --seeds, --starts, --rewind-epochs, --rounds,
--dense-only; LMC's --starts, --copies, --data-seed) are not part of it: each unit has its own folder, so a
rerun with more of them extends the folder. Arguments that change no number (--output-dir, --overwrite,
--report-only, --push-to-hub, checkpoint and progress options, evaluation batch sizes) are not part of it either.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from utils.cli import UsageError
from utils.results import read_json, write_json

FILE = "fingerprint.json"


# ------------------------------------------------------------------------------------------------ hashes
def weights_hash(net) -> str:
    """SHA-256 of a network: its configuration (architecture, and the teacher/student seeds and alpha that
    rebuild its teacher and initialisation) and every tensor of its state dict (name, dtype, shape, bytes)."""
    import torch

    digest = hashlib.sha256()
    config = net.config() if hasattr(net, "config") else {}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (fingerprints of --checkpoint files; checkpoint manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def short(digest: str) -> str:
    return digest[:8]


def display_name(ref: str) -> str:
    """A folder-safe name for a --student reference: the folder's name (`runs/A/` -> `A`; a run's `student/`
    subfolder -> the run's name) or a Hub id's model name."""
    path = Path(str(ref).rstrip("/"))
    in_run = path.name == "student" and (path.parent / "config.json").exists()
    name = path.parent.name if in_run else path.name
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name) or "student"


# ---------------------------------------------------------------------------------------------- checking
def settings(args, keys) -> dict:
    """{'--flag': value} of the named argparse destinations (tuples as lists, so they compare with JSON)."""
    out = {}
    for key in keys:
        value = getattr(args, key)
        out["--" + key.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
    return out


def read(folder: Path) -> dict | None:
    return read_json(Path(folder) / FILE)


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(map(_shown, value)) if value else "(none)"
    return json.dumps(value) if isinstance(value, str) else str(value)


def difference(folder: Path, made: dict, asked: dict) -> tuple[str, str]:
    """(flag, one-line reason) for the first entry of `asked` that the folder's fingerprint does not match."""
    changed = [k for k in asked if made.get(k) != asked[k]] + [k for k in made if k not in asked]
    first, more = changed[0], f" (also differ: {', '.join(changed[1:])})" if len(changed) > 1 else ""
    was, now = made.get(first), asked.get(first)
    if first == "--student":
        was, now = ([was] if isinstance(was, str) else was or []), ([now] if isinstance(now, str) else now or [])
        what = ("from a different student (weights hash {}, asked {})" if len(was) == len(now) == 1 else
                "from other students (weights hashes {}, asked {})").format(" ".join(map(short, was)),
                                                                          " ".join(map(short, now)))
    elif first == "--points":
        what = "from other points (selector:weights hash {}, asked {})".format(
            *(" ".join(f"{sel}:{short(h)}" for sel, h in v or []) for v in (was, now)))
    else:
        what = (f"with {_shown(was) if first in made else '(not set)'}, "
                f"asked {_shown(now) if first in asked else '(not set)'}")
    return first.split(" ")[0], (f"{folder} was made {what}{more}; pass --overwrite to replace its results or use "
                                 "another --output-dir")


def check(folder: Path, kind: str, asked: dict, overwrite: bool, owned: list[Path]) -> str:
    """Decide what to do with `folder` before any work, changing nothing: 'new' (nothing there), 'continue'
    (made with the same fingerprint: skip what is finished, resume what was interrupted) or 'replace' (other
    results and --overwrite: the caller deletes them with `discard` once the new run is ready). Raises a
    one-line UsageError for other results without --overwrite. `owned`: what the script writes there."""
    folder = Path(folder)
    made = read(folder)
    if made is not None and made.get("kind") != kind:  # never replaced: this script knows not what it holds
        raise UsageError("--output-dir", f"{folder} holds {made.get('kind')} results, not {kind}; use another "
                                         "--output-dir")
    if made is not None:
        if made.get("defines") == asked:
            return "continue"
        if overwrite:
            return "replace"
        flag, reason = difference(folder, made.get("defines") or {}, asked)
        raise UsageError(flag, reason)
    if not any(os.path.lexists(p) for p in owned):
        return "new"
    if overwrite:
        return "replace"
    raise UsageError("--output-dir", f"{folder} holds {kind} results without a {FILE} (made by an older version), "
                                     "so they cannot be checked; pass --overwrite to replace them or use another "
                                     "--output-dir")


def discard(folder: Path, owned: list[Path]) -> None:
    """Delete the fingerprint first (so a crash mid-way leaves nothing that looks checked), then what the script
    owns in `folder`; never anything else the folder holds."""
    (Path(folder) / FILE).unlink(missing_ok=True)
    for path in owned:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def write(folder: Path, kind: str, defines: dict, **about) -> None:
    """fingerprint.json: `kind` and `defines` are compared on a rerun; `about` (references, names, the script's
    version) is recorded for the reader only."""
    write_json(Path(folder) / FILE, {"kind": kind, "defines": defines, **about})
