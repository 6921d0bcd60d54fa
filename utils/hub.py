"""Loading students: one resolver for a run folder, a `save_pretrained` folder or a Hub model id."""
from __future__ import annotations

import json
from pathlib import Path

from utils.cli import UsageError
from utils.models import DistillationNetwork


def resolve_student(ref: str, flag: str = "--student", revision: str | None = None):
    """Return (student network in eval mode, run config dict or None).

    `ref` may be a run folder (holding student/ and config.json), a save_pretrained folder (config.json +
    model.safetensors) or a Hub model id. Weights are always loaded with strict=True, so a folder whose
    weights do not match its config fails loudly.
    """
    path = Path(ref)
    run_config = None
    if (path / "student" / "config.json").exists():
        if (path / "config.json").exists():
            run_config = json.loads((path / "config.json").read_text())
        path = path / "student"
    elif path.exists() and not (path / "config.json").exists():
        raise UsageError(flag, f"{ref} is neither a run folder (with student/) nor a save_pretrained folder")
    elif not path.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") != 1):
        raise UsageError(flag, f"no such folder {ref!r} (and not a Hub id of the form owner/name)")
    try:
        net = DistillationNetwork.from_pretrained(str(path) if path.exists() else ref, revision=revision,
                                                  strict=True)
    except (OSError, ValueError) as err:
        if path.exists():
            raise  # a local folder that does not load is corrupt: show the real error
        raise UsageError(flag, f"could not load {ref!r} from the Hub ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]}); check the id, or download it first and run "
                               "with HF_HUB_OFFLINE=1") from None
    return net.eval(), run_config
