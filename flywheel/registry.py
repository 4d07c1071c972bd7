"""MLflow: the policy's registered model, its versions, lineage tags and the champion/candidate aliases.

MLflow is the source of truth for which weights are the champion; the local model store is only a verified cache
of registered versions' artifacts.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CHAMPION = "champion"
CANDIDATE = "candidate"
TAG = "flywheel."  # prefix of every tag this project writes
PROMOTED_AT = f"{TAG}promoted_at"  # set on a version whenever it becomes champion
# Set when `flywheel prune --refused` deleted a version's registered weights.
WEIGHTS_PRUNED_AT = f"{TAG}weights_pruned_at"
WEIGHTS_PRUNED_BY = f"{TAG}weights_pruned_by"


class RegistryError(RuntimeError):
    pass


class VersionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    source: str
    description: str = ""


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: str
    previous: str | None
    promoted: bool
    reason: str


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str, artifact_root: Path) -> str:
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        # A tracking server decides where artifacts live (its --default-artifact-root or proxied
        # --artifacts-destination, e.g. s3://...): a client-side folder would be invisible to other machines.
        return mlflow_client.create_experiment(name)
    artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow_client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def _info(version) -> VersionInfo:
    return VersionInfo(
        name=version.name, version=str(version.version), aliases=list(getattr(version, "aliases", []) or []),
        tags=dict(version.tags or {}), run_id=version.run_id, source=version.source,
        description=version.description or "",
    )


def get_version(tracking_uri: str, name: str, ref: str) -> VersionInfo:
    """A version by number ('3'), alias ('champion') or 'v3'."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    ref = ref[1:] if ref.startswith("v") and ref[1:].isdigit() else ref
    try:
        if ref.isdigit():
            return _info(mlflow_client.get_model_version(name, ref))
        return _info(mlflow_client.get_model_version_by_alias(name, ref))
    except MlflowException as error:
        raise RegistryError(f"registered model {name!r} has no version or alias {ref!r}") from error


def find_version(tracking_uri: str, name: str, ref: str) -> VersionInfo | None:
    try:
        return get_version(tracking_uri, name, ref)
    except RegistryError:
        return None


def list_versions(tracking_uri: str, name: str) -> list[VersionInfo]:
    mlflow_client = client(tracking_uri)
    found = mlflow_client.search_model_versions(f"name = '{name}'")
    if not found:
        return []
    # search_model_versions leaves every version's aliases empty; the registered model holds them.
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted((mlflow_client.get_registered_model(name).aliases or {}).items()):
        aliases.setdefault(str(version), []).append(alias)
    infos = (_info(v).model_copy(update={"aliases": aliases.get(str(v.version), [])}) for v in found)
    return sorted(infos, key=lambda v: int(v.version))


def find_round_version(tracking_uri: str, name: str, round_number: int) -> VersionInfo | None:
    """The version a round already registered, so a re-run never registers a second one."""
    for info in list_versions(tracking_uri, name):
        if info.tags.get(f"{TAG}round") == str(round_number):
            return info
    return None


def ensure_registered_model(tracking_uri: str, name: str, description: str) -> None:
    """Create the registered model ``name`` unless it exists (its description is set only on creation)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlflow_client.create_registered_model(name, description=description)


def register_model_dir(
    tracking_uri: str,
    name: str,
    model_dir: Path,
    run_id: str,
    *,
    tags: dict[str, str],
    description: str,
    aliases: tuple[str, ...] = (),
    artifact_path: str = "model",
) -> VersionInfo:
    """Log the model folder as the run's ``artifact_path`` artifact and register it as a new version (a run that
    registers two models, the policy and the SPaR refiner, logs each under its own path)."""
    ensure_registered_model(tracking_uri, name, description="Policy trained by the flywheel, round by round.")
    mlflow_client = client(tracking_uri)
    mlflow_client.log_artifacts(run_id, str(model_dir), artifact_path=artifact_path)
    run = mlflow_client.get_run(run_id)
    version = mlflow_client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id, tags=tags, description=description
    )
    for alias in aliases:
        mlflow_client.set_registered_model_alias(name, alias, version.version)
    return get_version(tracking_uri, name, str(version.version))


# Why a hard link cannot be made where a copy can: another filesystem, or one without links (or out of them).
_NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})


def _link_local_artifact(source: str, staging: Path) -> bool:
    """A local artifact's files hard-linked into ``staging`` (as a download would lay them out), so the model store's
    copy of a version costs no disk beside its registered artifact: the champion's weights are read from the store by
    every round, and copied they were stored twice (0.5 GB for the default model). Nothing writes into either folder
    in place (the checksums file is replaced atomically, which breaks its link), and the checksums are verified as
    for a download. False, with nothing left in ``staging``: not a local folder, or no link possible there."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(source)
    if parsed.scheme not in ("file", "") or parsed.netloc not in ("", "localhost"):
        return False
    folder = Path(unquote(parsed.path))
    if not folder.is_dir():
        return False
    target = staging / folder.name
    try:
        for path in sorted(folder.rglob("*")):
            destination = target / path.relative_to(folder)
            if path.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, destination)
    except OSError as error:
        shutil.rmtree(target, ignore_errors=True)
        if error.errno in _NO_LINK_ERRNOS:
            return False
        raise
    return True


def materialize(tracking_uri: str, info: VersionInfo, store: Path) -> Path:
    """A registered version's weights as a verified local folder (downloaded once into the model store)."""
    from flywheel.models import (
        METADATA_FILE,
        ModelError,
        check_model_dir,
        replace_dir,
        verify_model,
        write_metadata,
    )

    pruned = info.tags.get(WEIGHTS_PRUNED_AT)
    if pruned:
        raise ModelError(f"{info.name} v{info.version}: its weights were deleted by `flywheel prune --refused` "
                         f"({pruned}, {info.tags.get(WEIGHTS_PRUNED_BY, 'unknown')}); its tags, metrics and "
                         f"dataset ({info.tags.get(f'{TAG}round_tag', 'no round tag')}) remain")
    target = Path(store) / info.name / f"v{info.version}"
    expected = info.tags.get(f"{TAG}model_sha256")
    if (target / METADATA_FILE).is_file():
        ref = verify_model(target)
        if expected and ref.sha256 != expected:
            raise ModelError(f"{target}: sha256 {ref.sha256[:12]} differs from registered {expected[:12]}")
        return target
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".v{info.version}."))
    try:
        if not _link_local_artifact(info.source, staging):
            mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(staging),
                                                tracking_uri=tracking_uri)
        folder = staging / info.source.rstrip("/").rsplit("/", 1)[-1]  # the artifact path: model, refiner
        downloaded = folder if folder.is_dir() else staging
        check_model_dir(downloaded)
        # One read of the downloaded weights: the digests recorded next to them are the ones checked (in staging,
        # removed below when they differ).
        actual = write_metadata(downloaded, source=f"models:/{info.name}/{info.version}").sha256
        if expected and actual != expected:
            raise ModelError(f"version {info.version}: downloaded sha256 {actual[:12]} != registered {expected[:12]}")
        replace_dir(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def set_champion(tracking_uri: str, name: str, version: str, *, reason: str, actor: str,
                 store: Path | None = None) -> Promotion:
    """Move ``champion`` to ``version``, remembering the one it replaces so rollback is one step.

    With ``store``, the version's weights are fetched and verified first: the alias only ever moves, in one registry
    call, onto a version that is complete and loadable.
    """
    mlflow_client = client(tracking_uri)
    target = get_version(tracking_uri, name, version)
    if store is not None:
        materialize(tracking_uri, target, store)
    current = find_version(tracking_uri, name, CHAMPION)
    if current is not None and current.version == target.version:
        return Promotion(name=name, version=target.version, previous=current.version, promoted=False,
                         reason=f"version {target.version} is already the champion")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if current is not None:
        mlflow_client.set_model_version_tag(name, target.version, f"{TAG}promoted_over", current.version)
    mlflow_client.set_model_version_tag(name, target.version, PROMOTED_AT, now)
    mlflow_client.set_model_version_tag(name, target.version, f"{TAG}promoted_by", actor)
    mlflow_client.set_model_version_tag(name, target.version, f"{TAG}promotion_reason", reason)
    mlflow_client.set_registered_model_alias(name, CHAMPION, target.version)
    return Promotion(name=name, version=target.version, previous=current.version if current else None,
                     promoted=True, reason=reason)


def rollback(tracking_uri: str, name: str, *, reason: str, actor: str, store: Path | None = None) -> Promotion:
    """Move ``champion`` back to the version it replaced; the demoted version keeps its data and a record why."""
    mlflow_client = client(tracking_uri)
    current = get_version(tracking_uri, name, CHAMPION)
    previous = current.tags.get(f"{TAG}promoted_over")
    if not previous:
        raise RegistryError(f"champion version {current.version} replaced no earlier champion: nothing to roll back to")
    if store is not None:
        materialize(tracking_uri, get_version(tracking_uri, name, previous), store)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    mlflow_client.set_model_version_tag(name, current.version, f"{TAG}rolled_back_at", now)
    mlflow_client.set_model_version_tag(name, current.version, f"{TAG}rolled_back_by", actor)
    mlflow_client.set_model_version_tag(name, current.version, f"{TAG}rollback_reason", reason)
    mlflow_client.set_registered_model_alias(name, CHAMPION, previous)
    return Promotion(name=name, version=previous, previous=current.version, promoted=True,
                     reason=f"rollback: {reason}")
