"""The CLI fails fast, in one line naming the file and field, on bad input (before any Prefect or model work)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flywheel.cli import app


@pytest.mark.parametrize(("text", "expected"), [
    ("trainig: {}\n", "trainig: unknown key"),
    ("training: {method: ppo}\n", "training.method"),
    ("generation: {samples_per_prompt: 1}\n", "samples_per_prompt >= 2"),
    ("model: [1, 2\n", "malformed YAML at line"),
    ("prompts: {source: missing.jsonl}\n", "prompts.source: file not found"),
])
def test_run_rejects_bad_config(tmp_path, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(app, ["run", "--config", str(recipe), "--workspace", str(tmp_path)])
    assert result.exit_code == 2
    assert str(recipe) in result.stderr and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".flywheel" / "mlflow.db").exists()  # nothing was written to the registry


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(app, ["status", "--config", str(tmp_path / "nope.yaml"), "--workspace", str(tmp_path)])
    assert result.exit_code == 2 and "config file not found" in result.stderr


def test_ui_starts_prefect_and_mlflow_on_loopback(tmp_path):
    import subprocess
    import time
    import urllib.request

    from cli import cli_env, flywheel_cmd

    log = tmp_path / "ui.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            flywheel_cmd("ui", "--workspace", str(tmp_path), "--prefect-port", "4299", "--mlflow-port", "5099"),
            cwd=tmp_path, env=cli_env(tmp_path), stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while "MLflow UI:" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert "http://127.0.0.1:4299" in log.read_text()
        assert urllib.request.urlopen("http://127.0.0.1:4299/api/health", timeout=10).status == 200
        assert urllib.request.urlopen("http://127.0.0.1:5099/health", timeout=10).status == 200
    finally:
        process.terminate()
        process.wait(timeout=60)
