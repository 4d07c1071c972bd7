"""Two `flywheel run` on one workspace: the second exits with a message naming the first, which goes on unharmed."""

from __future__ import annotations

import time

from cli import run_cli, start_cli
from helpers import tiny_recipe, write_recipe

from flywheel import registry


def test_a_second_run_on_a_busy_workspace_exits_with_a_clear_message(tiny_model_dir, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, review__mode="required", review__timeout_s=600))
    log = tmp_path / "first.log"
    first = start_cli(workspace, "run", "--config", str(recipe), log=log)
    try:
        deadline = time.time() + 300
        while "paused since" not in run_cli(workspace, "review", "--config", str(recipe)).stdout:
            assert first.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, "the first round never paused"
            time.sleep(3)
        # The first round holds the workspace while it waits for its reviewer.
        second = run_cli(workspace, "run", "--config", str(recipe), check=False)
        assert second.returncode == 2
        message = next(line for line in second.stderr.splitlines() if line.startswith("error:"))
        assert "another flywheel round is running in this workspace" in message
        assert f"pid {first.pid}" in message and "--wait" in message
        run_cli(workspace, "review", "--config", str(recipe), "--approve", "--reviewer", "alice")
        assert first.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if first.poll() is None:
            first.kill()
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    assert [v.version for v in registry.list_versions(uri, "tiny-policy")] == ["1", "2"]
    assert (workspace / ".flywheel" / "rounds" / "round-0001.json").is_file()
    assert not (workspace / ".flywheel" / "rounds" / "round-0002.json").exists()
