"""Preflight checks, and writes that meet a full disk: one clear error naming the file, and no file left behind."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from flywheel import preflight
from flywheel.config import parse_config
from flywheel.preflight import DiskFullError, PreflightError, check_dvc_remote, check_prompts
from flywheel.prompts import PromptFileError
from flywheel.workspace import Workspace


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs, filled to the last byte."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root): {mounted.stderr.strip()}")
    try:
        (disk / "out").mkdir()  # before the disk fills: a folder takes space too
        with (disk / "filler").open("wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        yield disk / "out"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _write_text(path: Path) -> None:
    from flywheel.models import atomic_write_text

    atomic_write_text(path, "x" * 300_000)


def _write_parquet(path: Path) -> None:
    import pandas as pd

    from flywheel.dataset import write_parquet

    write_parquet(pd.DataFrame({"text": [str(i) * 1000 for i in range(300)]}), path)


def _save_prompts(path: Path) -> None:
    from flywheel.prompts import save_prompts, synthesize_prompts

    save_prompts(synthesize_prompts(256) * 1, path)


@pytest.mark.parametrize("write,name", [(_write_text, "record.json"), (_write_parquet, "pairs.parquet"),
                                        (_save_prompts, "prompts.jsonl")], ids=["text", "parquet", "prompts"])
def test_a_full_disk_fails_clearly_and_leaves_no_partial_file(full_disk, write, name):
    target = full_disk / name
    with pytest.raises(DiskFullError) as caught:
        write(target)
    message = str(caught.value)
    assert str(target) in message and "disk is full" in message and "\n" not in message
    assert list(full_disk.iterdir()) == []  # neither the file nor its temporary twin


def test_disk_full_error_is_an_os_error_and_recognized():
    import errno

    assert preflight.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert preflight.is_disk_full(RuntimeError("sqlite3.OperationalError: database or disk is full"))
    assert not preflight.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert isinstance(preflight.disk_full("/x/y"), OSError)


def test_free_space_floor_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_free_bytes", lambda path: 5 * 1024**2)
    with pytest.raises(PreflightError, match=r"storage.state_dir .*/state: disk is full or nearly so \(5.0 MiB free"):
        preflight.check_free_space(tmp_path / "state", "storage.state_dir")


def test_writable_dir_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PreflightError, match=r"cannot be created: .*/file is not a folder"):
        preflight.check_writable_dir(tmp_path / "file" / "remote", "storage.dvc_remote")


@pytest.mark.parametrize("remote,expected", [
    ("ftp://host/path", "unsupported URL scheme 'ftp'"),
    ("gs://bucket/path", "pip install 'dvc[gs]'"),
])
def test_remote_urls_need_a_known_scheme_and_its_plugin(remote, expected, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name.startswith("dvc_") else real(name))
    import re

    with pytest.raises(PreflightError, match=re.escape(expected)) as caught:
        check_dvc_remote(remote)
    assert f"storage.dvc_remote {remote!r}" in str(caught.value)


def test_remote_host_that_does_not_resolve(monkeypatch):
    def fail(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(PreflightError, match=r"unreachable: host 'dvc.example.org' does not resolve"):
        check_dvc_remote("https://dvc.example.org/store")


def test_local_remote_is_probed_not_created(tmp_path):
    check_dvc_remote(str(tmp_path / "new" / "remote"))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone and no folder was made


def test_a_prompt_file_too_small_to_split_is_a_prompt_file_error(tmp_path):
    source = tmp_path / "one.jsonl"
    source.write_text('{"id": "a", "prompt": "Write.", "constraints": [{"type": "all_lowercase", "args": {}}]}\n')
    config = parse_config({"prompts": {"source": str(source)}})
    with pytest.raises(PromptFileError, match=r"one.jsonl: 1 prompts .* both sides need at least one"):
        check_prompts(config, tmp_path)


def test_base_model_is_checked_only_before_the_first_champion(tmp_path, monkeypatch):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    config = parse_config({"model": {"base": str(broken)}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = Workspace.from_config(config, tmp_path / "ws")
    from flywheel.models import ModelError

    with pytest.raises(ModelError, match="no weights"):
        preflight.check_base_model(config, workspace)
    monkeypatch.setattr(preflight, "_has_champion", lambda config, workspace: True)
    preflight.check_base_model(config, workspace)  # the round starts from the champion: the base is not used


def test_preflight_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = parse_config({})
    preflight.preflight(config, Workspace.from_config(config, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_remote_host_lookup_that_hangs_is_cut_short(monkeypatch):
    import threading

    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: release.wait(30))
    monkeypatch.setattr(preflight, "DNS_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(PreflightError, match=r"no DNS answer for host 'dvc.example.org' within 0.2 s"):
            check_dvc_remote("https://dvc.example.org/store")
    finally:
        release.set()


def test_bf16_generation_on_a_cpu_without_native_bf16_is_refused_before_the_round(monkeypatch):
    import flywheel.generation as generation
    from flywheel.config import parse_config
    from flywheel.preflight import PreflightError, check_generation_precision

    config = parse_config({"generation": {"precision": "bf16", "device": "cpu"}})
    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(PreflightError, match="no native bf16"):
        check_generation_precision(config)
    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: True)
    check_generation_precision(config)
    check_generation_precision(parse_config({"generation": {"device": "cpu"}}))
