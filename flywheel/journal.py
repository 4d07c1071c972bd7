"""The round's stage journal: each finished stage's typed output, recorded atomically once its files are in place.

A re-run of an unfinished round (after a crash, a kill or a failed stage) reads the journal and resumes after the
last finished stage instead of generating, versioning, training or registering twice. Entries are written after a
stage's outputs (each written atomically itself), so an entry's presence means the stage is complete.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from flywheel.models import atomic_write_text

T = TypeVar("T", bound=BaseModel)
HEADER = "round.json"


class JournalError(RuntimeError):
    """An unfinished round cannot be resumed as asked: the message says why and what to do."""


class StageJournal:
    """Finished stages of one round, in the order the flow ran them."""

    def __init__(self, folder: Path, round_name: str, config_hash: str):
        self.folder = Path(folder)
        self.round_name = round_name
        self.config_hash = config_hash
        self._position = 0
        header = self.folder / HEADER
        if header.is_file():
            recorded = json.loads(header.read_text())["config_hash"]
            if recorded != config_hash:
                raise JournalError(
                    f"{round_name} is unfinished and was started with config {recorded}, not {config_hash}: re-run "
                    f"it with the same recipe, or pass --restart to set its finished stages aside and start it anew"
                )
        else:
            atomic_write_text(header, json.dumps({"round": round_name, "config_hash": config_hash}))

    def _entry(self, position: int, stage: str) -> Path:
        return self.folder / f"{position:02d}-{stage}.json"

    def finished(self) -> list[str]:
        return [p.stem.split("-", 1)[1] for p in sorted(self.folder.glob("[0-9][0-9]-*.json"))]

    def lookup(self, stage: str, kind: type[T]) -> T | None:
        """The stage's recorded output when this stage finished before at this position, else None.

        A miss forgets every later entry: stages after a re-run one must run again on its new outputs.
        """
        position = self._position
        self._position += 1
        entry = self._entry(position, stage)
        if entry.is_file():
            value = kind.model_validate(json.loads(entry.read_text())["value"])
            missing = [p for p in _paths(value) if not Path(p).exists()]
            if not missing:
                return value
        for later in sorted(self.folder.glob("[0-9][0-9]-*.json")):
            if int(later.name[:2]) >= position:
                later.unlink()
        return None

    def run(self, stage: str, kind: type[T], compute: Callable[..., T], *args: object,
            on_resume: Callable[[str], None] | None = None) -> T:
        """The stage's output: recorded earlier, or computed now and recorded."""
        from flywheel.faults import fault_point

        done = self.lookup(stage, kind)
        if done is not None:
            if on_resume:
                on_resume(f"{self.round_name}: {stage} finished in an earlier attempt; resuming after it")
            return done
        fault_point(f"before:{stage}")
        value = compute(*args)
        self.record(stage, value)
        fault_point(f"after:{stage}")
        return value

    def recorded(self, stage: str, kind: type[T]) -> T:
        """A finished stage's recorded output, read by name without moving the journal's position.

        A routed stage's flow run reads its inputs this way, and the round reads back what that run recorded.
        """
        entries = list(self.folder.glob(f"[0-9][0-9]-{stage}.json"))
        if not entries:
            raise JournalError(f"{self.round_name}: no finished {stage} stage in {self.folder} (a routed stage needs "
                               f"the round's workspace on a volume every worker sees, at the same path)")
        return kind.model_validate(json.loads(entries[0].read_text())["value"])

    def seek(self, stage: str) -> None:
        """Continue at ``stage`` as the round's own journal reaches it: at its entry if it has one, else right after
        the last finished stage (the round journaled every earlier stage and waits for this one)."""
        positions = {p.stem.split("-", 1)[1]: int(p.name[:2]) for p in self.folder.glob("[0-9][0-9]-*.json")}
        self._position = positions.get(stage, max(positions.values(), default=-1) + 1)

    def record(self, stage: str, value: BaseModel) -> None:
        entry = self._entry(self._position - 1, stage)
        payload = {"stage": stage, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "value": value.model_dump(mode="json")}
        atomic_write_text(entry, json.dumps(payload, indent=2))


def set_aside(folder: Path) -> Path | None:
    """Move an unfinished round's journal out of the way (kept, not deleted) so the round starts anew."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = folder.with_name(f"{folder.name}.set-aside-{stamp}")
    os.replace(folder, target)
    return target


def _paths(value: object) -> list[str]:
    """Every file or folder a stage output points at (fields whose name ends in ``path``), nested values included."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            inner = getattr(value, name)
            if name.endswith("path") and isinstance(inner, str) and inner:
                found.append(inner)
            else:
                found.extend(_paths(inner))
    elif isinstance(value, (list, tuple)):
        for inner in value:
            found.extend(_paths(inner))
    return found
