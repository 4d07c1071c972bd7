"""Fault figures: faults injected and survived, bad inputs tried and rejected cleanly, rows lost.

Kills a round (SIGKILL, whole process group) at every fault point of ``flywheel.faults`` in turn, re-running it each
time, then finishes it and compares its dataset with an uninterrupted round of the same recipe and seed, table by
table. Then runs the bad-input table test and counts its cases. A tiny random model keeps it to minutes on a CPU.

    .venv/bin/python bench/faults.py [--workspace /tmp/flywheel-bench-faults]

Prints a table and writes bench/out/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

FAULT_POINTS = [
    "after:prompts", "during:generate", "after:generate", "after:judge", "after:build", "after:quality",
    "after:review", "after:version", "during:train", "after:train", "after:evaluate", "after:register",
    "after:promote",
]
TABLES = ("samples", "pairs", "sft", "quarantine")


def run_round(workspace: Path, recipe: Path, fault: str | None) -> int:
    from cli import cli_env, flywheel_cmd

    from flywheel.faults import FAULT_ENV

    env = cli_env(workspace) | ({FAULT_ENV: fault} if fault else {})
    result = subprocess.run(flywheel_cmd("run", "--config", str(recipe), "--workspace", str(workspace)), cwd=workspace,
                            env=env, capture_output=True, text=True, start_new_session=True)
    return result.returncode


def table_rows(workspace: Path) -> dict[str, int]:
    from flywheel.dataset import read_table

    data = workspace / "data" / "rounds" / "round-0001"
    return {name: len(read_table(data / f"{name}.parquet")) for name in TABLES if (data / f"{name}.parquet").is_file()}


def bad_input_cases(out: Path) -> tuple[int, int]:
    report = out / "bad-input.xml"
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_bad_input.py"), "-q",
                    f"--junitxml={report}"], cwd=ROOT, capture_output=True, text=True)
    if not report.is_file():
        return 0, 0
    # The table's rows only (one parametrized test), and a skipped row (no tmpfs, say) is not counted as tried.
    cases = [case for case in ElementTree.parse(report).getroot().iter("testcase")
             if case.get("name", "").startswith("test_bad_input_fails_in_one_line_and_writes_nothing[")]
    tried = [case for case in cases if not any(child.tag == "skipped" for child in case)]
    rejected = [case for case in tried if not any(child.tag in {"failure", "error"} for child in case)]
    return len(tried), len(rejected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/flywheel-bench-faults"))
    args = parser.parse_args()
    from helpers import tiny_recipe, write_recipe
    from tiny import build_tiny_model

    from flywheel.versioning import dvc_md5
    from flywheel.workspace import quiet_environment

    os.environ.update(quiet_environment())
    shutil.rmtree(args.workspace, ignore_errors=True)
    reference, interrupted = args.workspace / "uninterrupted", args.workspace / "interrupted"
    model = build_tiny_model(args.workspace / "tiny")
    recipe = tiny_recipe(model, training__max_steps=4, training__checkpoint_steps=2, training__batch_size=1)
    started = time.perf_counter()
    for workspace in (reference, interrupted):
        workspace.mkdir(parents=True)
        write_recipe(workspace / "recipe.yaml", recipe)
    if run_round(reference, reference / "recipe.yaml", None) != 0:
        raise SystemExit("the uninterrupted reference round failed")
    survived = 0
    for point in FAULT_POINTS:
        code = run_round(interrupted, interrupted / "recipe.yaml", point)
        print(f"  {point:<18} exit {code}", flush=True)
        survived += code == -signal.SIGKILL
    finished = run_round(interrupted, interrupted / "recipe.yaml", None) == 0
    want, got = table_rows(reference), table_rows(interrupted)
    rows_lost = sum(max(0, want[name] - got.get(name, 0)) for name in want)
    same_hash = finished and dvc_md5(interrupted, "round-0001") == dvc_md5(reference, "round-0001")
    tried, rejected = bad_input_cases(args.workspace)
    figures = {
        "faults injected": len(FAULT_POINTS),
        "faults survived (killed, then resumed to the same data)": survived if same_hash else 0,
        "dataset hash equals the uninterrupted round's": same_hash,
        "rows lost": rows_lost,
        "bad inputs tried": tried,
        "bad inputs rejected cleanly": rejected,
        "seconds": round(time.perf_counter() - started, 1),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps({**figures, "tables": {"reference": want, "interrupted": got}},
                                                indent=2))


if __name__ == "__main__":
    main()
