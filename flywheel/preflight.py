"""Checks a round runs before it does any work: everything it can learn in a second or two about its input and its
storage, so that bad input fails up front with one clear line instead of an hour into a round.

``preflight`` checks, in order: a recipe that routes stages to work pools has a Prefect server to send them to, the
workspace and the state folder can be written and have room, the DVC remote is a writable folder (or a URL whose
DVC plugin is installed and whose host resolves), the prompt file loads and splits, and, on first use, the base
model folder is complete (and matches its recorded checksums). It writes nothing but a probe file it removes at once.
Errors name the file, folder, URL or recipe field concerned.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from flywheel.config import BUILTIN_PREFIX, FlywheelConfig

# A floor, not an estimate: below this a round cannot even store its data and state (a real round with the default
# model needs a few GiB for model versions). The check only turns a late "No space left on device" into an early one.
MIN_FREE_BYTES = 256 * 1024**2
DNS_TIMEOUT_S = 5.0
# DVC remote schemes and the DVC plugin package each needs (the `dvc[...]` extra in parentheses).
DVC_PLUGINS = {
    "s3": ("dvc_s3", "s3"), "gs": ("dvc_gs", "gs"), "gcs": ("dvc_gs", "gs"), "azure": ("dvc_azure", "azure"),
    "ssh": ("dvc_ssh", "ssh"), "http": ("dvc_http", "http"), "https": ("dvc_http", "http"),
    "webdav": ("dvc_webdav", "webdav"), "webdavs": ("dvc_webdav", "webdav"), "hdfs": ("dvc_hdfs", "hdfs"),
    "oss": ("dvc_oss", "oss"),
}


class PreflightError(RuntimeError):
    """Input or storage a round cannot use, found before the round starts; the message names what and where."""


class DiskFullError(OSError):
    """A write failed because the disk is full; the message names the file, which is not left behind."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return str(self.args[0])


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # Some libraries (pyarrow, SQLite) only say so in the message.
    text = str(error).lower()
    return "no space left on device" in text or "database or disk is full" in text


def disk_full(path: Path | str, error: BaseException | None = None) -> DiskFullError:
    """The one error a full disk becomes, naming the file that could not be written."""
    free = _free_bytes(Path(path))
    where = f" ({size_text(free)} free)" if free is not None else ""
    return DiskFullError(f"{path}: disk is full{where}; free some space and run again")


def size_text(count: int) -> str:
    """Bytes as people read them: 512 B, 3.4 MiB, 1.2 GiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(_existing_ancestor(path)).free
    except OSError:
        return None


def describe_os_error(error: OSError) -> str:
    """Why a write failed, in the words a user acts on."""
    if is_disk_full(error):
        return "disk is full"
    return {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}.get(error.errno, error.strerror or str(error))


def check_writable_dir(path: Path, what: str) -> None:
    """``path`` is (or can be created as) a folder this process can write to: probed by writing a file there."""
    path = Path(path)
    anchor = _existing_ancestor(path)
    if not anchor.is_dir():
        raise PreflightError(f"{what} {path}: cannot be created: {anchor} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".flywheel-preflight-")
    except OSError as error:
        raise PreflightError(f"{what} {path}: not writable ({describe_os_error(error)})") from None
    os.close(fd)
    os.unlink(probe)


def check_free_space(path: Path, what: str, minimum: int = MIN_FREE_BYTES) -> None:
    free = _free_bytes(Path(path))
    if free is not None and free < minimum:
        raise PreflightError(f"{what} {path}: disk is full or nearly so ({size_text(free)} free; a round needs at "
                             f"least {size_text(minimum)})")


def check_storage(config: FlywheelConfig, workspace) -> None:
    """The workspace, the state folder and a local DVC remote: writable, with room."""
    folders = [("workspace", workspace.root), ("storage.state_dir", workspace.state)]
    for what, folder in folders:
        check_writable_dir(folder, what)
    for what, folder in folders:
        check_free_space(folder, what)
    check_dvc_remote(workspace.dvc_remote)


def check_dvc_remote(remote: str) -> None:
    """A local remote must be a writable folder; a URL needs its DVC plugin and a host name that resolves."""
    if "://" not in remote:
        check_writable_dir(Path(remote), "storage.dvc_remote")
        check_free_space(Path(remote), "storage.dvc_remote")
        return
    parts = urlsplit(remote)
    scheme = parts.scheme.lower()
    if scheme == "file":
        check_dvc_remote(parts.path)
        return
    if scheme not in DVC_PLUGINS:
        raise PreflightError(f"storage.dvc_remote {remote!r}: unsupported URL scheme {scheme!r} "
                             f"(DVC remotes: a folder or {', '.join(sorted(DVC_PLUGINS))} URLs)")
    module, extra = DVC_PLUGINS[scheme]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PreflightError(f"storage.dvc_remote {remote!r}: DVC cannot reach {scheme}:// remotes without its "
                             f"plugin: pip install 'dvc[{extra}]'")
    host = _remote_host(scheme, parts)
    if host:
        _resolve(host, remote)


def _remote_host(scheme: str, parts) -> str | None:
    """The host a remote's traffic goes to, where the URL decides it."""
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return urlsplit(endpoint).hostname if endpoint else "s3.amazonaws.com"
    if scheme in ("gs", "gcs"):
        return "storage.googleapis.com"
    if scheme in ("azure", "oss"):
        return None  # the account's endpoint comes from DVC's own remote settings
    return parts.hostname


def _resolve(host: str, remote: str) -> None:
    """The host name resolves, within DNS_TIMEOUT_S (a lookup has no timeout of its own: it runs in a daemon thread
    that a hung resolver cannot keep alive past the process)."""
    import threading

    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None)
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    worker = threading.Thread(target=lookup, name="preflight-dns", daemon=True)
    worker.start()
    worker.join(DNS_TIMEOUT_S)
    if not outcome:
        raise PreflightError(f"storage.dvc_remote {remote!r}: unreachable: no DNS answer for host {host!r} "
                             f"within {DNS_TIMEOUT_S:g} s")
    error = outcome[0]
    if error is not None:
        raise PreflightError(f"storage.dvc_remote {remote!r}: unreachable: host {host!r} does not resolve "
                             f"({getattr(error, 'strerror', None) or error})")


def check_prompts(config: FlywheelConfig, root: Path) -> None:
    """The prompt file loads (every row valid) and splits into non-empty train and held-out sets."""
    from flywheel.config import resolve
    from flywheel.prompts import PromptFileError, load_prompts, split_prompts

    if config.prompts.source == "builtin":
        return
    path = resolve(config.prompts.source, root)
    prompts = load_prompts(path)
    try:
        split_prompts(prompts, config.prompts.eval_fraction, seed=config.prompts.seed)
    except ValueError as error:
        detail = str(error).removeprefix("split_prompts: ").replace("eval_fraction", "prompts.eval_fraction")
        raise PromptFileError(f"{path}: {detail}") from None


def check_base_model(config: FlywheelConfig, workspace) -> None:
    """On first use the base model is registered as version 1: a local folder must be complete and, where it records
    checksums, unchanged. Once a champion exists, the base is not used and not checked."""
    from flywheel.config import resolve

    base = config.model.base
    if base.startswith(BUILTIN_PREFIX):
        return
    folder = resolve(base, workspace.root)
    if not folder.exists() and base.count("/") == 1 and not base.startswith((".", "/", "~")):
        return  # a hub id: fetched on first use
    if _has_champion(config, workspace):
        return
    from flywheel.models import METADATA_FILE, check_model_dir, verify_model

    check_model_dir(folder)
    if (folder / METADATA_FILE).is_file():
        verify_model(folder)


def _has_champion(config: FlywheelConfig, workspace) -> bool:
    uri = workspace.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return False  # no registry database yet: nothing registered (and nothing created by asking)
    from flywheel import registry

    return registry.find_version(uri, config.model.registered_name, registry.CHAMPION) is not None


def check_stage_pools(config: FlywheelConfig) -> None:
    """Routed stages run on workers through the server's deployments: without a server there is nowhere to send them."""
    if not config.deployment.stage_pools:
        return
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        routes = ", ".join(f"{stage} -> {pool}" for stage, pool in config.deployment.stage_pools.items())
        raise PreflightError(f"deployment.stage_pools routes stages to work pools ({routes}): that needs a Prefect "
                             f"server (PREFECT_API_URL) with the recipe deployed (`flywheel deploy`) and a worker per "
                             f"pool; remove stage_pools to run every stage here")


def check_open_ended_prompts(config: FlywheelConfig, root: Path) -> None:
    """A round with an open-ended win rate loads its prompt file now, not after training."""
    from flywheel.open_ended import load_open_ended

    if config.evaluation.open_ended:
        load_open_ended(config.evaluation.open_ended_prompts, config.evaluation.open_ended, root)


def check_generation_precision(config: FlywheelConfig) -> None:
    """bf16 generation on a CPU that would emulate it fails now, not at the generate stage."""
    from flywheel.generation import EngineError, resolve_precision
    from flywheel.models import resolve_device

    gen = config.generation
    if gen.engine == "transformers" and gen.precision == "bf16":
        try:
            resolve_precision(gen.precision, resolve_device(gen.device))
        except EngineError as error:
            raise PreflightError(str(error)) from None


def preflight(config: FlywheelConfig, workspace) -> None:
    """Every cheap check, before a round writes anything (see the module docstring)."""
    check_stage_pools(config)
    check_generation_precision(config)
    check_storage(config, workspace)
    check_prompts(config, workspace.root)
    check_open_ended_prompts(config, workspace.root)
    check_base_model(config, workspace)
