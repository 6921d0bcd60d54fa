"""The Hugging Face Hub side: one student resolver, the model card, and the single function that writes to
the Hub (`hub_commit`). Tests replace `hub_api` to check what would be uploaded without a network."""
from __future__ import annotations

import contextlib
import datetime
import io
import secrets
import tempfile
import time
from pathlib import Path

import pandas as pd

from utils.cli import UsageError
from utils.models import PAPER_URL, DistillationNetwork
from utils.results import markdown_table, read_config

RUN_FILES = ("config.json", "metrics.csv", "summary.json", "probe_table.csv", "probe_accuracy.png")
PROBE_FILES = ("probe_table.csv", "probe_results.json")


class PushError(RuntimeError):
    """A push that failed after its retries; the local files are untouched."""


def new_run_id(name: str) -> str:
    """Unique per run (folder name, UTC start time, random suffix): its Hub paths never collide."""
    return f"{name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# -------------------------------------------------------------------------------------------- loading
def resolve_student(ref: str, flag: str = "--student", revision: str | None = None):
    """Return (student network in eval mode, run config dict or None).

    `ref` may be a run folder (holding student/ and config.json), a save_pretrained folder (config.json +
    model.safetensors) or a Hub model id. Weights are always loaded with strict=True, so a folder whose
    weights do not match its config fails loudly. With HF_HUB_OFFLINE=1 a Hub id loads from the local cache.
    Every way a reference can fail to load is one UsageError naming `flag` and the file.
    """
    path = Path(ref).expanduser()
    run_config = None
    if (path / "student" / "config.json").exists():
        run_config = read_run_config(path, flag)
        path = path / "student"
    elif (path / "checkpoints").is_dir() or (path / "metrics.csv").exists():
        raise UsageError(flag, f"{ref} is a run folder whose run has not finished (no student/ yet); rerun its "
                               "train_distill.py command to finish it, then probe it")
    elif path.exists() and not (path / "config.json").exists():
        raise UsageError(flag, f"{ref} is neither a run folder (with student/) nor a save_pretrained folder")
    elif not path.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") != 1):
        raise UsageError(flag, f"no such folder {ref!r} (and not a Hub id of the form owner/name)")
    if path.exists():
        if not (path / "model.safetensors").exists():
            raise UsageError(flag, f"{path} has no model.safetensors: not a save_pretrained folder of a student")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights from ..."
                net = DistillationNetwork.from_pretrained(str(path))
        except Exception as err:  # noqa: BLE001 - a local folder that does not load is truncated or corrupt
            raise UsageError(flag, f"{path} does not load as a student ({type(err).__name__}: "
                                   f"{' '.join(str(err).split())[:300]}); its files are truncated, corrupt or do "
                                   "not match its config.json") from None
        return net.eval(), run_config
    try:
        net = DistillationNetwork.from_pretrained(ref, revision=revision)
    except (OSError, ValueError) as err:
        raise UsageError(flag, f"could not load {ref!r} from the Hub ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]}); check the id, or download it on a machine "
                               "with internet and run with HF_HUB_OFFLINE=1") from None
    return net.eval(), run_config


def read_run_config(run_dir: Path, flag: str) -> dict:
    config = read_config(run_dir)
    if config is None:
        raise UsageError(flag, f"{run_dir}/config.json is missing or not valid JSON")
    return config


# ---------------------------------------------------------------------------------------- model card
def write_model_card(student_dir: Path, config: dict, table: pd.DataFrame) -> None:
    """README.md of a student folder: what it is, its probe table, its configuration and how to load it."""
    from utils.results import atomic_path

    meta = config.get("dataset_meta") or {}
    dataset = config["dataset"]
    hub_dataset = meta.get("source") if "/" in str(meta.get("source", "")) and not Path(meta["source"]).exists() else None
    front = ["---", "library_name: random-teachers", "tags:", "- random-teachers", "- self-distillation",
             "- model_hub_mixin", "- pytorch_model_hub_mixin"] + ([f"datasets:\n- {hub_dataset}"] if hub_dataset else []) + ["---"]
    keys = ("model", "norm", "alpha", "repeat", "teacher_seed", "student_seed", "seed", "probe_seed", "epochs",
            "batch_size", "lr", "weight_decay", "bias_weight_decay", "loss", "teacher_temp", "student_temp",
            "bottleneck", "hidden_dims", "bottleneck_dim", "out_dim", "train_subset", "input_noise", "val_size",
            "steps", "world_size", "autocast")
    rows = "\n".join(f"| `{k}` | `{config.get(k)}` |" for k in keys if k in config)
    text = f"""{chr(10).join(front)}

# Random-teacher student: {config['model']} distilled on {dataset}

A {config['model']} encoder with a DINO-style head, trained to match a **frozen, randomly initialised
teacher** of the same architecture, without labels, augmentation or EMA, as in
["Random Teachers are Good Teachers"]({PAPER_URL}) (ICML 2023). Dataset: `{dataset}`
(source `{meta.get('source')}`, revision `{meta.get('revision')}`).

## Probe accuracy (%)

Linear and k-NN probes of the 512-d encoder output (eval mode) on the test split. Student "best" is the
maximum over probed epochs after initialisation (selected on the test set, as the paper reports); the teacher
and the raw pixels are probed once.

{markdown_table(table)}

## Configuration

| argument | value |
|---|---|
{rows}

## How to load

```python
from utils.models import DistillationNetwork          # from the random-teachers toolkit
student = DistillationNetwork.from_pretrained("<this repo or folder>")   # strict loading
teacher = student.build_teacher()                      # the random teacher, rebuilt from its seed
embedding = student.encoder(images)                    # 512-d features (normalise images with the
                                                       # dataset's mean/std: {config.get('mean')} / {config.get('std')})
```
or probe it directly: `python probe.py --student <this repo or folder> --dataset cifar10`.
"""
    with atomic_path(student_dir / "README.md") as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------- pushing
def hub_api():
    """The Hub client. The one seam tests replace."""
    from huggingface_hub import HfApi

    return HfApi()


def hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """A local copy of the files of a Hub repo that match `patterns` (through the same seam as uploads)."""
    try:
        return Path(hub_api().snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, no access: one line, not a traceback
        raise UsageError("--hub", f"could not read {repo_id!r} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]})") from None


def hub_commit(repo_id: str, files: dict[str, Path], message: str, private: bool = False,
               repo_type: str = "model", retries: int = 4) -> str:
    """Every Hub write goes through here: create the repo if needed, then ONE commit adding `files`
    ({path in repo: local file}). Retries with exponential backoff (e.g. concurrent-commit conflicts);
    offline mode is not retried. Raises PushError; never touches the local files."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import OfflineModeIsEnabled

    api = hub_api()
    for attempt in range(retries):
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local)) for p, local in files.items()]
            info = api.create_commit(repo_id, ops, commit_message=message, repo_type=repo_type)
            return str(getattr(info, "commit_url", info))
        except OfflineModeIsEnabled as err:
            raise PushError(f"HF_HUB_OFFLINE is set ({err})") from err
        except Exception as err:  # noqa: BLE001 - network, server and conflict errors are retried
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (400, 401, 403, 404) or isinstance(err, FileNotFoundError) or attempt == retries - 1:
                raise PushError(f"{type(err).__name__}: {err}") from err
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def upload_plan(folder: Path, run_id: str) -> dict[str, Path]:
    """What a push uploads, as {path in repo: local file}.

    A training run: its student at the repo root (so `from_pretrained(repo)` gives the newest student) and
    everything, student included, under `runs/<run_id>/`, which no other run writes. A probe result: its
    tables under `probes/<run_id>/`. Metric tables go as CSV and as parquet.
    """
    folder = Path(folder)
    plan: dict[str, Path] = {}
    if (folder / "student").is_dir():
        for f in sorted((folder / "student").iterdir()):
            plan[f.name] = f
            plan[f"runs/{run_id}/student/{f.name}"] = f
        prefix, names = f"runs/{run_id}", RUN_FILES
    else:
        prefix, names = f"probes/{run_id}", PROBE_FILES
    for name in names:
        if (folder / name).exists():
            plan[f"{prefix}/{name}"] = folder / name
    return plan


def _with_parquet(plan: dict[str, Path], tmp: str) -> dict[str, Path]:
    """The plan plus a parquet copy of every CSV table (written under `tmp`)."""
    plan = dict(plan)
    for path_in_repo, local in list(plan.items()):
        if local.suffix == ".csv":
            parquet = Path(tmp) / (local.stem + ".parquet")
            pd.read_csv(local).to_parquet(parquet, index=False)
            plan[path_in_repo[:-4] + ".parquet"] = parquet
    return plan


def push_results(folder: Path, repo_id: str, run_id: str, private: bool = False) -> str:
    """Upload a finished run or probe folder in one commit (CSV tables also converted to parquet)."""
    with tempfile.TemporaryDirectory() as tmp:
        return hub_commit(repo_id, _with_parquet(upload_plan(Path(folder), run_id), tmp), f"Add {run_id}",
                          private=private)


def _explain_failure(err: PushError, repo_id: str, folder: Path, retry: str) -> bool:
    print(f"push to {repo_id} failed: {err}\nThe local folder {folder} is complete. Retry with:\n  {retry}")
    return False


def push_or_explain(folder: Path, repo_id: str, run_id: str, private: bool, script: str) -> bool:
    """Push, printing where it went or, on failure, that the local files are complete and how to retry."""
    try:
        url = push_results(folder, repo_id, run_id, private)
    except PushError as err:
        return _explain_failure(err, repo_id, folder, f"python {script} --push-only {folder} --push-to-hub {repo_id}")
    print(f"pushed {folder} to https://huggingface.co/{repo_id} ({url})")
    return True


def push_tables(folder: Path, names, repo_id: str, run_id: str, prefix: str, private: bool, script: str) -> bool:
    """imp.py / lmc.py: one commit adding `folder/<name>` for each existing name under `<prefix>/<run_id>/` (CSV
    also as parquet); on failure says the local files are complete and how to retry. Returns success."""
    folder = Path(folder)
    plan = {f"{prefix}/{run_id}/{name}": folder / name for name in names if (folder / name).exists()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plan = _with_parquet(plan, tmp)
            url = hub_commit(repo_id, plan, f"Add {prefix} {run_id}", private=private)
    except PushError as err:
        return _explain_failure(err, repo_id, folder, f"python {script} --report-only --output-dir {folder} "
                                                      f"--push-to-hub {repo_id}")
    print(f"pushed {len(plan)} files of {folder} to https://huggingface.co/{repo_id} ({url})")
    return True
