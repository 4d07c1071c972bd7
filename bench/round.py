"""Wall time of each stage of one flywheel round, as Prefect recorded it.

Runs `flywheel run` on a recipe in a scratch workspace (never the checkout), then reads the task runs of that round
from the workspace's Prefect database and prints a table, writes bench/out/round.json and bench/out/round.png.

    .venv/bin/python bench/round.py [--config configs/default.yaml] [--workspace /tmp/flywheel-bench]
        [--api-url http://127.0.0.1:4200/api]

With ``--api-url`` the round reports to a running Prefect server (as scheduled rounds on a worker do) and the
stage times are read from it: the embedded API's start and stop drop out of the process wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def run_round(config: Path, workspace: Path, api_url: str | None = None) -> tuple[float, datetime, datetime]:
    """The process's wall seconds, and when it started and ended (UTC, to place the flow runs within it)."""
    env = dict(os.environ, PREFECT_HOME=str(workspace / ".flywheel" / "prefect"), FLYWHEEL_WORKSPACE=str(workspace))
    env.pop("PREFECT_API_URL", None)
    if api_url:  # a running Prefect server, as scheduled rounds use: no embedded API to start and stop
        env["PREFECT_API_URL"] = api_url
    started, began = time.perf_counter(), datetime.now(timezone.utc)
    common.run_child([sys.executable, "-m", "flywheel.cli", "run", "--config", str(config), "--workspace",
                      str(workspace)], env=env, cwd=workspace)
    return time.perf_counter() - started, began, datetime.now(timezone.utc)


class RoundTimes(NamedTuple):
    stages: list[tuple[str, float]]  # each task's name and seconds, in start order
    flow_seconds: float  # the round flow run's
    outer: tuple[datetime, datetime]  # the outer ``flywheel`` run's start and end


def stage_times(workspace: Path, api_url: str | None = None) -> RoundTimes:
    """The times Prefect recorded for the workspace's latest round."""
    from flywheel.workspace import quiet_environment

    os.environ.update(quiet_environment())
    os.environ["PREFECT_HOME"] = str(workspace / ".flywheel" / "prefect")
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    else:
        os.environ.pop("PREFECT_API_URL", None)
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["flywheel-round"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not runs:
            raise SystemExit("no flywheel-round run found in the workspace's Prefect database")
        flow_run = runs[0]
        outer = flow_run  # the round is a subflow of `flywheel` when run by the CLI
        if flow_run.parent_task_run_id is not None:
            outer = client.read_flow_run(client.read_task_run(flow_run.parent_task_run_id).flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    stages = sorted(((t.name.rsplit("-", 1)[0], t.start_time, t.end_time) for t in tasks if t.start_time and t.end_time),
                    key=lambda item: item[1])
    flow_seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
    return RoundTimes([(name, (end - start).total_seconds()) for name, start, end in stages], flow_seconds,
                      (outer.start_time, outer.end_time))


def orchestration_overhead(workspace: Path, stages: dict[str, float], wall: float) -> dict:
    """Model compute against everything else in the round's process (Prefect, MLflow, DVC, GX, file I/O, model
    loading and conversion). Compute is the generation engine's own time and the trainer's (both from the round
    record) plus the whole evaluate stage (greedy answers of two models and the perplexity probe; its model loading
    is counted as compute, which flatters the overhead a little). Provisioning the base model (download and
    dequantization, first round only) is reported apart."""
    records = sorted((workspace / ".flywheel" / "rounds").glob("round-*.json"))
    if not records:
        raise SystemExit(f"no round record under {workspace / '.flywheel' / 'rounds'}")
    record = json.loads(records[-1].read_text())
    generate = float(record["generations"]["seconds"])
    train = float(record["trained"]["seconds"]) if record.get("trained") else 0.0
    evaluate = stages.get("evaluate", 0.0)
    provision = stages.get("resolve-champion", 0.0)
    compute = generate + train + evaluate
    rest = wall - compute
    return {"generate_seconds": generate, "train_seconds": train, "evaluate_seconds": evaluate,
            "compute_seconds": compute, "overhead_seconds": rest, "overhead_share": rest / wall,
            "provision_seconds": provision,
            "overhead_share_without_provisioning": (rest - provision) / (wall - provision)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/flywheel-bench-round"))
    parser.add_argument("--keep", action="store_true", help="reuse the workspace (the base model stays provisioned)")
    parser.add_argument("--api-url", default=None,
                        help="a running Prefect server's API (http://127.0.0.1:4200/api, e.g. from `flywheel ui`): "
                             "the round reports to it as scheduled rounds do, instead of starting the embedded API")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    if args.workspace.resolve() == ROOT or ROOT in args.workspace.resolve().parents:
        raise SystemExit("use a scratch workspace outside the project checkout")
    if args.workspace.exists() and not args.keep:
        shutil.rmtree(args.workspace)
    args.workspace.mkdir(parents=True, exist_ok=True)

    load_before = common.machine_load()
    wall, began, ended = run_round(args.config.resolve(), args.workspace, args.api_url)
    load_after = common.machine_load()
    stages, flow_seconds, (outer_start, outer_end) = stage_times(args.workspace, args.api_url)
    accounted = sum(seconds for _, seconds in stages)
    # Outside the flow runs: the CLI's start (interpreter, imports, the API's boot, preflight) and its end (the
    # parent flow's artifacts come before outer_end; after it: draining logs and events, stopping the API, exit).
    before_flow = (outer_start - began).total_seconds()
    after_flow = (ended - outer_end).total_seconds()
    print(f"\nround wall time (process): {wall:8.1f} s   flow run: {flow_seconds:8.1f} s   process start to the "
          f"flywheel run's start: {before_flow:.1f} s   its end to the process's exit: {after_flow:.1f} s")
    print(f"{'stage':24} {'seconds':>9} {'share':>7}")
    for name, seconds in stages:
        print(f"{name:24} {seconds:9.1f} {seconds / flow_seconds:7.1%}")
    print(f"{'(between tasks)':24} {flow_seconds - accounted:9.1f} {(flow_seconds - accounted) / flow_seconds:7.1%}")

    overhead = orchestration_overhead(args.workspace, dict(stages), wall)
    print(f"model compute {overhead['compute_seconds']:.1f} s (generation engine {overhead['generate_seconds']:.1f}, "
          f"training {overhead['train_seconds']:.1f}, evaluate stage {overhead['evaluate_seconds']:.1f}); "
          f"everything else {overhead['overhead_seconds']:.1f} s = {overhead['overhead_share']:.1%} of the process "
          f"wall time; without the one-time base provisioning ({overhead['provision_seconds']:.1f} s): "
          f"{overhead['overhead_share_without_provisioning']:.1%}")

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": str(args.config), "api": args.api_url or "embedded", "process_seconds": wall,
              "flow_seconds": flow_seconds, "before_flow_seconds": before_flow, "after_flow_seconds": after_flow,
              "load": {"before": load_before, "after": load_after}, "overhead": overhead,
              "stages": [{"stage": n, "seconds": s} for n, s in stages]}
    (out / "round.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(stages) + 1.5))
    ax.barh([n for n, _ in stages][::-1], [s for _, s in stages][::-1], color="#4472c4")
    ax.set_xlabel("seconds")
    ax.set_title(f"flywheel round stages ({args.config.name}), flow {flow_seconds:.0f} s")
    common.save_figure(fig, out / "round.png")
    print(f"wrote {out / 'round.json'} and {out / 'round.png'}")
    print(f"load: before {common.load_note(load_before)}; after {common.load_note(load_after)}")
    if not args.no_mlflow:
        rows = [{"stage": n, "seconds": s, "share": s / flow_seconds} for n, s in stages]
        run_id = common.log_to_mlflow("round", rows, {
            "config": args.config.name, "api": args.api_url or "embedded", "load_before": load_before,
            "load_after": load_after,
        }, [out / "round.json", out / "round.png"], metrics={"flow_seconds": flow_seconds, "process_seconds": wall,
                                                             "overhead_share": overhead["overhead_share"]})
        print(f"logged MLflow run {run_id} in experiment {common.EXPERIMENT}")


if __name__ == "__main__":
    main()
