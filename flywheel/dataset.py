"""Turn judged samples into training data (preference pairs and SFT rows) and write a round's dataset."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flywheel.config import FeedbackConfig

PAIR_COLUMNS = ["row_id", "prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
SFT_COLUMNS = ["row_id", "prompt_id", "prompt", "completion", "score"]
TABLES = ("samples", "pairs", "sft")


def build_pairs(samples, config: FeedbackConfig):
    """One pair per prompt: its best sample as chosen, its worst as rejected, when they differ enough.

    A prompt whose samples all pass (or all fail) teaches no preference and yields no pair. Samples no judge gave a
    verdict are left out.
    """
    import pandas as pd

    rows = []
    for prompt_id, group in _with_verdict(samples).groupby("prompt_id", sort=True):
        ranked = group.sort_values(["score", "sample_index"], ascending=[False, True])
        best, worst = ranked.iloc[0], ranked.iloc[-1]
        if config.chosen_must_pass and not best["passed"]:
            continue
        if best["score"] - worst["score"] <= config.min_score_gap or best["score"] <= worst["score"]:
            continue
        if best["response"].strip() == worst["response"].strip():
            continue
        rows.append({
            "row_id": f"{prompt_id}-pair",
            "prompt_id": prompt_id,
            "prompt": best["prompt"],
            "chosen": best["response"],
            "rejected": worst["response"],
            "chosen_score": float(best["score"]),
            "rejected_score": float(worst["score"]),
        })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def build_sft(samples, config: FeedbackConfig):
    """Every distinct sample that meets the score bar is an SFT target for its prompt (never one without a verdict),
    at most ``config.sft_max_per_prompt`` of them per prompt. Rows carry ``ended``: whether the sample finished, or
    the token limit cut it off."""
    import pandas as pd

    samples = _with_verdict(samples)
    accepted = samples[samples["score"] >= config.sft_min_score]
    accepted = accepted.assign(_key=accepted["response"].str.strip()).drop_duplicates(["prompt_id", "_key"])
    if config.sft_max_per_prompt is not None and len(accepted):
        finished = accepted["finished"] if "finished" in accepted.columns else True
        ranked = accepted.assign(_finished=finished).sort_values(
            ["prompt_id", "score", "_finished", "sample_index"], ascending=[True, False, False, True], kind="stable")
        kept = ranked.groupby("prompt_id", sort=False).head(config.sft_max_per_prompt).index
        accepted = accepted.loc[accepted.index.isin(kept)]
    rows = [
        {
            "row_id": f"{r.prompt_id}-sft{r.sample_index}",
            "prompt_id": r.prompt_id,
            "prompt": r.prompt,
            "completion": r.response,
            "score": float(r.score),
            "ended": bool(getattr(r, "finished", True)),
        }
        for r in accepted.itertuples()
    ]
    return pd.DataFrame(rows, columns=[*SFT_COLUMNS, "ended"])


def _with_verdict(samples):
    # "verdict" is "none" where the deciding judge gave no verdict (see flywheel.feedback); older tables lack it.
    return samples[samples["verdict"] != "none"] if "verdict" in samples.columns else samples


class DatasetManifest(BaseModel):
    """What a round's dataset folder holds: written last into it, so it is complete when present."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    round: int
    files: dict[str, str]  # file name -> sha256
    rows: dict[str, int]
    config_hash: str
    parent_version: str
    prompts: int


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary file next to ``path`` to write, renamed onto ``path`` when the block succeeds: a killed or failed
    write leaves the previous file or none, never half of one, and no stray temporary file in a folder DVC versions
    and the manifest lists. A full disk becomes the one-line DiskFullError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        from flywheel.preflight import disk_full, is_disk_full

        if is_disk_full(error):
            raise disk_full(path) from error
        raise


def write_parquet(frame, path: Path) -> str:
    """Atomic write (temporary file, then rename); returns the file's sha256."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return file_sha256(path)


def write_json(data: dict, path: Path) -> str:
    from flywheel.models import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(path: Path):
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable Parquet table: {error}") from error
