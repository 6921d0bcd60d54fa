"""Push a finished script's tables and figures to the Hub, through the single write seam utils.hub.hub_commit."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from utils.hub import PushError, hub_commit


def push_tables(folder: Path, names, repo_id: str, run_id: str, prefix: str, private: bool, script: str) -> bool:
    """One commit adding `folder/<name>` for each existing name under `<prefix>/<run_id>/` (CSV also as
    parquet). On failure says that the local files are complete and how to retry; returns success."""
    folder = Path(folder)
    plan = {f"{prefix}/{run_id}/{name}": folder / name for name in names if (folder / name).exists()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for path_in_repo, local in list(plan.items()):
                if local.suffix == ".csv":
                    parquet = Path(tmp) / (local.stem + ".parquet")
                    pd.read_csv(local).to_parquet(parquet, index=False)
                    plan[path_in_repo[:-4] + ".parquet"] = parquet
            url = hub_commit(repo_id, plan, f"Add {prefix} {run_id}", private=private)
    except PushError as err:
        print(f"push to {repo_id} failed: {err}\nThe local folder {folder} is complete. Retry with:\n"
              f"  python {script} --report-only --output-dir {folder} --push-to-hub {repo_id}")
        return False
    print(f"pushed {len(plan)} files of {folder} to https://huggingface.co/{repo_id} ({url})")
    return True
