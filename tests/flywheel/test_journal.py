import os
import signal
import subprocess
import sys

import pytest
from pydantic import BaseModel

from flywheel.faults import FAULT_ENV
from flywheel.journal import JournalError, StageJournal, set_aside


class Out(BaseModel):
    path: str
    rows: int


class Calls:
    def __init__(self):
        self.names: list[str] = []

    def stage(self, name: str, path):
        def compute(rows: int) -> Out:
            self.names.append(name)
            path.write_text(name)
            return Out(path=str(path), rows=rows)
        return compute


def _run_all(folder, calls, tmp_path, config_hash="h1"):
    journal = StageJournal(folder, "round-0001", config_hash)
    first = journal.run("first", Out, calls.stage("first", tmp_path / "a.txt"), 1)
    second = journal.run("second", Out, calls.stage("second", tmp_path / "b.txt"), first.rows + 1)
    return first, second


def test_a_finished_stage_is_not_run_again(tmp_path):
    calls = Calls()
    assert _run_all(tmp_path / "j", calls, tmp_path)[1].rows == 2
    resumed = []
    journal = StageJournal(tmp_path / "j", "round-0001", "h1")
    again = journal.run("first", Out, calls.stage("first", tmp_path / "a.txt"), 1, on_resume=resumed.append)
    assert again == Out(path=str(tmp_path / "a.txt"), rows=1)
    assert calls.names == ["first", "second"]
    assert resumed and "first finished in an earlier attempt" in resumed[0]
    assert StageJournal(tmp_path / "j", "round-0001", "h1").finished() == ["first", "second"]


def test_a_stage_whose_output_file_is_gone_runs_again_with_every_later_stage(tmp_path):
    calls = Calls()
    _run_all(tmp_path / "j", calls, tmp_path)
    (tmp_path / "a.txt").unlink()
    _run_all(tmp_path / "j", calls, tmp_path)
    assert calls.names == ["first", "second", "first", "second"]


def test_a_different_recipe_cannot_resume_the_round(tmp_path):
    _run_all(tmp_path / "j", Calls(), tmp_path)
    with pytest.raises(JournalError, match="started with config h1, not h2.*--restart"):
        StageJournal(tmp_path / "j", "round-0001", "h2")


def test_set_aside_keeps_the_old_journal_and_starts_anew(tmp_path):
    calls = Calls()
    _run_all(tmp_path / "j", calls, tmp_path)
    kept = set_aside(tmp_path / "j")
    assert kept is not None and (kept / "round.json").is_file() and not (tmp_path / "j").exists()
    _run_all(tmp_path / "j", calls, tmp_path, config_hash="h2")
    assert calls.names == ["first", "second", "first", "second"]
    assert set_aside(tmp_path / "nothing") is None


_KILLED = """
import sys
from pathlib import Path
from pydantic import BaseModel
from flywheel.journal import StageJournal
class Out(BaseModel):
    rows: int
journal = StageJournal(Path(sys.argv[1]), "round-0001", "h")
journal.run("first", Out, lambda: Out(rows=1))
journal.run("second", Out, lambda: Out(rows=2))
print("finished")
"""


@pytest.mark.parametrize("point,finished", [("before:first", []), ("after:first", ["first"]),
                                            ("before:second", ["first"]), ("after:second", ["first", "second"])])
def test_fault_points_kill_the_process_where_named(tmp_path, point, finished):
    env = {**os.environ, FAULT_ENV: point}
    result = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "j")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL and "finished" not in result.stdout
    assert StageJournal(tmp_path / "j", "round-0001", "h").finished() == finished
