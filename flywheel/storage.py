"""Disk a workspace can give back: copies of weights the registry holds, and, when asked, refused candidates' weights.

A round leaves up to three copies of its candidate's weights (about 0.5 GB each for the default model): the folder
it trained into (``models/<name>/rounds/<round>``), the artifact MLflow logged when it registered the version, and,
once the version is promoted or evaluated, the model store's ``v<N>`` folder fetched from that artifact. The
registry is the source of truth (registry.py), so the first and the last are copies; ``prune`` removes them. A store
copy of a local artifact is hard-linked to it and costs no disk of its own; the sizes ``prune`` reports count only
what it gives back. With ``refused=True`` it also deletes the registered weights of candidates that were never
champion, keeping the newest ``keep_refused``; their versions stay registered with their tags, metrics and dataset,
marked as pruned, so lineage still traces them and fetching their weights fails with a clear error. Nothing a round
in progress needs is touched: a round's own folder is removed only after the round's record is written, and pruning
holds the round lock.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from flywheel import registry
from flywheel.preflight import size_text
from flywheel.workspace import Workspace, round_lock

PRUNED_AT, PRUNED_BY = registry.WEIGHTS_PRUNED_AT, registry.WEIGHTS_PRUNED_BY

Kind = Literal["round_output", "store_copy", "registered_weights"]


class PruneItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Kind
    name: str  # the registered model
    version: str | None  # the registered version the weights belong to (None: none matches them)
    location: str  # a local folder, or the registered artifact's URI
    size: int  # bytes
    remove: bool
    reason: str


class PrunePlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    items: list[PruneItem]

    @property
    def removable(self) -> list[PruneItem]:
        return [item for item in self.items if item.remove]

    @property
    def removable_bytes(self) -> int:
        return sum(item.size for item in self.removable)


class PruneResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    plan: PrunePlan
    removed: list[PruneItem]

    @property
    def freed_bytes(self) -> int:
        return sum(item.size for item in self.removed)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def unshared_bytes(path: Path) -> int:
    """The bytes removing ``path`` gives back: files with no other hard link (a store copy of a local artifact is
    linked to it, registry.materialize)."""
    return sum(stat.st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink()
               and (stat := f.stat()).st_nlink == 1)


def _artifact_bytes(uri: str, tracking_uri: str) -> int:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(uri, tracking_uri=tracking_uri)

    def walk(path: str | None) -> int:
        return sum(walk(info.path) if info.is_dir else (info.file_size or 0) for info in repo.list_artifacts(path))

    return walk(None)


def registered_versions(workspace: Workspace, policy: str) -> dict[str, list[registry.VersionInfo]]:
    """The versions of the policy's registered model and of those next to it in the model store (the SPaR refiner),
    for each that exists."""
    names = {policy}
    if workspace.models.is_dir():
        names |= {p.name for p in workspace.models.iterdir() if p.is_dir()}
    listed = {name: registry.list_versions(workspace.tracking_uri, name) for name in sorted(names)}
    return {name: versions for name, versions in listed.items() if versions}


def is_refused(info: registry.VersionInfo) -> bool:
    """Trained by a round, never champion, and holding no alias: a candidate the gate (or a reviewer) turned down."""
    return (info.tags.get(f"{registry.TAG}round", "0") != "0" and not info.aliases
            and registry.PROMOTED_AT not in info.tags and PRUNED_AT not in info.tags)


def plan_prune(workspace: Workspace, policy: str, *, refused: bool = False, keep_refused: int = 0) -> PrunePlan:
    """What ``prune`` would remove, and what it keeps and why. Reads the registry and the disk; changes nothing."""
    if keep_refused < 0:
        raise ValueError(f"keep_refused must be >= 0, got {keep_refused}")
    items: list[PruneItem] = []
    for name, versions in registered_versions(workspace, policy).items():
        doomed = _refused_to_delete(workspace, versions, keep_refused) if refused else set()
        items += [_round_output(workspace, name, folder, versions, doomed)
                  for folder in _subfolders(workspace.models / name / "rounds")]
        by_number = {v.version: v for v in versions}
        items += [_store_copy(name, folder, by_number) for folder in _subfolders(workspace.models / name)
                  if re.fullmatch(r"v\d+", folder.name)]
        if refused:
            items += _registered_weights(workspace, name, versions, doomed)
    return PrunePlan(items=items)


def _subfolders(folder: Path) -> list[Path]:
    # Hidden folders are a download or replacement in progress (registry.materialize, models.replace_dir).
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def _refused_to_delete(workspace: Workspace, versions: list[registry.VersionInfo], keep: int) -> set[str]:
    finished = [v for v in versions if is_refused(v) and _round_finished(workspace, v)]
    finished.sort(key=lambda v: int(v.version))
    return {v.version for v in finished[:max(len(finished) - keep, 0)]}


def _round_finished(workspace: Workspace, info: registry.VersionInfo) -> bool:
    tag = info.tags.get(f"{registry.TAG}round_tag")
    return bool(tag) and (workspace.records / f"{tag}.json").is_file()


def _round_output(workspace: Workspace, name: str, folder: Path, versions: list[registry.VersionInfo],
                  doomed: set[str]) -> PruneItem:
    from flywheel.models import read_metadata

    size = folder_bytes(folder)

    def item(remove: bool, reason: str, version: str | None = None) -> PruneItem:
        return PruneItem(kind="round_output", name=name, version=version, location=str(folder), size=size,
                         remove=remove, reason=reason)

    if not (workspace.records / f"{folder.name}.json").is_file():
        return item(False, "its round has no record yet (running, or to be resumed)")
    meta = read_metadata(folder)
    if meta is None:
        return item(False, "incomplete folder (no checksums): not a copy of any registered version")
    match = next((v for v in versions if v.tags.get(f"{registry.TAG}model_sha256") == meta["sha256"]), None)
    if match is None:
        return item(False, "no registered version has these weights (sha256): this is their only copy")
    if PRUNED_AT in match.tags:
        return item(False, f"v{match.version}'s registered weights were pruned: this is their only copy",
                    match.version)
    if match.version in doomed:
        return item(True, f"v{match.version} was refused and its registered weights are deleted too", match.version)
    return item(True, f"registered as v{match.version} (same sha256)", match.version)


def _store_copy(name: str, folder: Path, versions: dict[str, registry.VersionInfo]) -> PruneItem:
    number = folder.name[1:]
    info = versions.get(number)
    size = unshared_bytes(folder)

    def item(remove: bool, reason: str) -> PruneItem:
        return PruneItem(kind="store_copy", name=name, version=number if info else None, location=str(folder),
                         size=size, remove=remove, reason=reason)

    if info is None:
        return item(False, "no such registered version: this may be the only copy")
    if info.aliases:
        return item(False, f"holds {', '.join(info.aliases)}: rounds use it")
    if PRUNED_AT in info.tags:
        return item(False, "its registered weights were pruned: this is their only copy")
    return item(True, "a copy of the registered weights, fetched again when used")


def _holds_candidate_only(info: registry.VersionInfo) -> bool:
    """The newest round's candidate, never champion: refused or awaiting a decision, it keeps the alias (and its
    weights) until the next round registers another."""
    return (info.tags.get(f"{registry.TAG}round", "0") != "0" and registry.CANDIDATE in info.aliases
            and registry.CHAMPION not in info.aliases and registry.PROMOTED_AT not in info.tags
            and PRUNED_AT not in info.tags)


def _registered_weights(workspace: Workspace, name: str, versions: list[registry.VersionInfo],
                        doomed: set[str]) -> list[PruneItem]:
    items = []
    for info in versions:
        if _holds_candidate_only(info):
            # Listed so a prune right after a refused round says why that round's weights stay.
            items.append(PruneItem(kind="registered_weights", name=name, version=info.version, location=info.source,
                                   size=_artifact_bytes(info.source, workspace.tracking_uri), remove=False,
                                   reason="holds candidate: a promotion may still pick it; deleted by a prune after "
                                          "the next round registers another"))
    for info in (v for v in versions if is_refused(v)):
        if info.version in doomed:
            reason = "refused candidate, never champion"
        elif not _round_finished(workspace, info):
            reason = "its round has no record yet"
        else:
            reason = "one of the newest refused candidates kept (--keep-refused)"
        items.append(PruneItem(kind="registered_weights", name=name, version=info.version, location=info.source,
                               size=_artifact_bytes(info.source, workspace.tracking_uri),
                               remove=info.version in doomed, reason=reason))
    return items


def prune(workspace: Workspace, policy: str, *, refused: bool = False, keep_refused: int = 0,
          actor: str = "flywheel", wait: bool = False) -> PruneResult:
    """Plan and remove under the round lock, so a round never sees a copy vanish while it runs (``wait``: block
    until a running round releases it, instead of failing with ``WorkspaceBusy``)."""
    with round_lock(workspace, wait=wait):
        return prune_holding_lock(workspace, policy, refused=refused, keep_refused=keep_refused, actor=actor)


def prune_holding_lock(workspace: Workspace, policy: str, *, refused: bool = False, keep_refused: int = 0,
                       actor: str = "flywheel") -> PruneResult:
    """``prune`` for a caller that holds the round lock already: the round flow, after it wrote its record.

    A registered version is checked again right before its weights go (a reviewer may have promoted it since the
    plan), and tagged as pruned before they are deleted: an interrupted prune leaves a version that says why its
    weights are incomplete, not one that fails its checksum unexplained.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    removed: list[PruneItem] = []
    plan = plan_prune(workspace, policy, refused=refused, keep_refused=keep_refused)
    for item in plan.removable:
        if item.kind == "registered_weights":
            if not is_refused(registry.get_version(workspace.tracking_uri, item.name, item.version)):
                continue
            mlflow_client = registry.client(workspace.tracking_uri)
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            mlflow_client.set_model_version_tag(item.name, item.version, PRUNED_AT, stamp)
            mlflow_client.set_model_version_tag(item.name, item.version, PRUNED_BY, actor)
            get_artifact_repository(item.location, tracking_uri=workspace.tracking_uri).delete_artifacts()
        elif not _remove_folder(Path(item.location)):
            continue
        removed.append(item)
    return PruneResult(plan=plan, removed=removed)


def _remove_folder(folder: Path) -> bool:
    """Move the folder aside, then delete it: it is never seen half deleted under its own name."""
    if not folder.is_dir():
        return False
    retired = folder.with_name(f".{folder.name}.pruned-{os.getpid()}")
    os.replace(folder, retired)
    shutil.rmtree(retired)
    return True


def describe(items: Iterable[PruneItem], root: Path) -> list[tuple[str, str, str, str, str]]:
    """Rows for a table: action, what (a folder relative to the workspace ``root``), version, size, reason."""
    labels = {"round_output": "round output", "store_copy": "store copy", "registered_weights": "registered weights"}

    def where(location: str) -> str:
        path = Path(location.removeprefix("file://"))
        return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else location

    return [("remove" if i.remove else "keep", f"{labels[i.kind]}: {where(i.location)}",
             f"{i.name} v{i.version}" if i.version else i.name, size_text(i.size), i.reason) for i in items]
