"""The ``flywheel`` command: it parses arguments and dispatches; the work happens in the library and the flows."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.config import ConfigError, FlywheelConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="A self-improvement flywheel for language models.")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe (default: configs/default.yaml).")]
WorkspaceOption = Annotated[
    Optional[Path], typer.Option("--workspace", "-w", help="git + DVC workspace (default: $FLYWHEEL_WORKSPACE or .).")
]
WaitOption = Annotated[bool, typer.Option(help="Wait for a round already running in this workspace.")]


def _fail(message: str) -> None:
    if "prefect" in sys.modules:  # its temporary server logs its shutdown at exit: the error stays the last line
        import logging

        logging.getLogger("prefect").setLevel(logging.WARNING)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _setup(config_path: Path | None, workspace: Path | None):
    """Load the recipe and point the embedded services at the workspace, before Prefect is imported."""
    from flywheel.workspace import Workspace, activate

    root = (workspace or Path(os.environ.get("FLYWHEEL_WORKSPACE") or Path.cwd())).resolve()
    if config_path is None and (root / "configs" / "default.yaml").is_file():
        config_path = root / "configs" / "default.yaml"
    try:
        config = load_config(config_path, base_dir=root) if config_path else FlywheelConfig()
    except ConfigError as error:
        _fail(str(error))
    ws = Workspace.from_config(config, root)
    try:
        activate(ws)
    except OSError as error:  # the state folder cannot be created: a read-only or full workspace, say
        from flywheel.preflight import describe_os_error

        _fail(f"storage.state_dir {ws.state}: cannot be created ({describe_os_error(error)})")
    return config, ws


@app.command()
def run(config: ConfigOption = None, workspace: WorkspaceOption = None,
        rounds: Annotated[int, typer.Option(min=1, help="Rounds to run, one after another.")] = 1,
        wait: WaitOption = False,
        restart: Annotated[bool, typer.Option(
            help="Start an unfinished round anew (its finished stages are set aside, not deleted).")] = False) -> None:
    """Run flywheel rounds and print a summary of each. An unfinished round resumes after its last finished stage."""
    cfg, ws = _setup(config, workspace)
    from flywheel.preflight import preflight

    try:  # bad input and unusable storage fail here, in a second, before Prefect starts or anything is written
        preflight(cfg, ws)
    except _user_errors() as error:
        _fail(str(error))
    from flywheel.temporary_api import TemporaryAPIError, start_temporary_api

    # Prefect's temporary API boots in its own process (3-9 s) while this one imports the flow and the libraries the
    # round needs (None: a server is configured).
    api = start_temporary_api()
    from flows.flywheel import flywheel

    if api is not None:
        _import_round_libraries()
        try:
            api.wait()
        except TemporaryAPIError as error:
            _fail(str(error))
    _terminal_without_user_tracebacks()
    try:
        records = flywheel(cfg, rounds=rounds, workspace=str(ws.root), wait=wait, restart=restart)
    except _user_errors() as error:
        # The Prefect run is marked failed with the full traceback; the terminal gets the one line that matters.
        _fail(f"{type(error).__name__}: {error}")
    except Exception as error:  # a disk that fills up mid-round (files, SQLite, DVC): one line, not a traceback
        from flywheel.preflight import disk_full, is_disk_full

        if not is_disk_full(error):
            raise
        _fail(str(disk_full(getattr(error, "filename", None) or ws.root)))
    _print_summary(records)


def _import_round_libraries() -> None:
    """Import what every round's stages import (the model stack, the quality gate, the registry): 6-8 s on 2
    cores that would otherwise be paid inside the stages, here paid while the API server boots."""
    import importlib

    for module in ("torch", "transformers.modeling_utils", "great_expectations", "mlflow"):
        importlib.import_module(module)


def _terminal_without_user_tracebacks() -> None:
    """A failure the user can act on reaches the terminal as the one ``error:`` line ``run`` prints; its traceback
    stays in the Prefect run's logs (the API handler sees the record before it propagates to the console)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    kinds = _user_errors()

    class UserErrorTracebacks(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], kinds))

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(UserErrorTracebacks())


def _user_errors() -> tuple[type[Exception], ...]:
    """Failures a user can act on: bad input or an unmet gate, not a bug in the flywheel."""
    from flywheel.distill import DistillError
    from flywheel.generation import EngineError
    from flywheel.journal import JournalError
    from flywheel.judges import JudgeError
    from flywheel.models import ModelError
    from flywheel.open_ended import OpenEndedError
    from flywheel.preflight import DiskFullError, PreflightError
    from flywheel.prompts import PromptFileError
    from flywheel.quality import QualityGateError
    from flywheel.registry import RegistryError
    from flywheel.reward import RewardModelError
    from flywheel.training import TrainingError
    from flywheel.versioning import VersioningError
    from flywheel.workspace import WorkspaceBusy

    # A routed stage's failed flow run (flows/stages.py, loaded with the round flow; importing it here would load
    # Prefect on every early error).
    routed = sys.modules.get("flows.stages")
    return (ConfigError, JournalError, ModelError, PromptFileError, QualityGateError, RegistryError, TrainingError,
            VersioningError, WorkspaceBusy, PreflightError, DiskFullError, EngineError, JudgeError, DistillError,
            RewardModelError, OpenEndedError, *((routed.StageRunFailed,) if routed else ()))


def summary_rows(record) -> dict[str, str]:
    """The figures a user checks after a round, as printable strings."""
    ev, trained, promotion = record.evaluation, record.trained, record.promotion
    return {
        "status": record.status,
        "parent version": f"v{record.parent_version}",
        "prompts": str(record.prompts.round_prompts),
        "samples": str(record.judged.rows),
        "sample pass rate": f"{record.judged.pass_rate:.3f}",
        "pairs": str(record.quality.clean.pairs),
        "sft rows": str(record.quality.clean.sft),
        "quarantined": str(record.quality.quarantined),
        "review": f"{'approved' if record.review.approved else 'rejected'} by {record.review.reviewer}",
        "train loss": f"{trained.train_loss:.4f}" if trained else "-",
        "eval before (champion)": f"{ev.champion.prompt_accuracy:.3f}" if ev else "-",
        "eval after (candidate)": f"{ev.candidate.prompt_accuracy:.3f}" if ev else "-",
        **{f"{metric} gain (95% CI)": _gain_text(estimate) for metric, estimate in
           (("prompt", ev and ev.prompt_gain), ("instruction", ev and ev.instruction_gain)) if estimate},
        "win rate vs champion": f"{ev.win_rate:.3f}" if ev else "-",
        **({"answers copying their instructions": f"{ev.candidate_echoes} (champion {ev.champion_echoes})"}
           if ev and ev.candidate_echoes is not None else {}),
        **({"answers repeating themselves": f"{ev.candidate_repetitive} (champion {ev.champion_repetitive})"}
           if ev and ev.candidate_repetitive is not None else {}),
        **({"open-ended win rate": f"{ev.open_ended.win_rate:.3f} ({ev.open_ended.judge}, "
                                   f"{ev.open_ended.prompts} prompts)"} if ev and ev.open_ended else {}),
        "new version": f"v{record.registration.version}" if record.registration else "-",
        "promoted": ("yes" if promotion.promoted else "no") if promotion else "-",
        "dataset tag": record.dataset.tag if record.dataset else "-",
    }


def _gain_text(estimate) -> str:
    return (f"{estimate.gain:+.3f} ({estimate.ci_low:+.3f} to {estimate.ci_high:+.3f}), "
            f"p={estimate.p_value:.2f}")


def _print_summary(records) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="flywheel rounds")
    table.add_column("")
    for record in records:
        table.add_column(record.name)
    rows = [summary_rows(r) for r in records]
    keys = list(dict.fromkeys(key for row in rows for key in row))  # a figure only some rounds have shows "-"
    for key in keys:
        table.add_row(key, *(row.get(key, "-") for row in rows))
    Console().print(table)
    for record in records:
        if record.promotion:
            typer.echo(f"{record.name}: {record.promotion.reason}")


@app.command()
def status(config: ConfigOption = None, workspace: WorkspaceOption = None) -> None:
    """Champion, candidate and the last rounds."""
    cfg, ws = _setup(config, workspace)
    from flywheel import registry
    from flywheel.stages import read_round_records

    name = cfg.model.registered_name
    typer.echo(f"workspace: {ws.root}\ntracking:  {ws.tracking_uri}\nmodel:     {name}")
    for alias in (registry.CHAMPION, registry.CANDIDATE):
        info = registry.find_version(ws.tracking_uri, name, alias)
        typer.echo(f"{alias:10} " + (f"v{info.version} (round {info.tags.get('flywheel.round', '?')})" if info else "-"))
    records = read_round_records(ws)
    if records:
        _print_summary(records[-5:])
    else:
        typer.echo("no finished rounds yet")


@app.command()
def promote(version: str, config: ConfigOption = None, workspace: WorkspaceOption = None,
            reason: Annotated[str, typer.Option(help="Why; recorded on the version.")] = "manual promotion",
            actor: Annotated[str, typer.Option(help="Who promotes.")] = os.environ.get("USER", "reviewer")) -> None:
    """Move the `champion` alias to VERSION (a number, or an alias such as `candidate`)."""
    cfg, ws = _setup(config, workspace)
    from flywheel import registry
    from flywheel.models import ModelError

    try:
        result = registry.set_champion(ws.tracking_uri, cfg.model.registered_name, version, reason=reason, actor=actor,
                                       store=ws.models)
    except (registry.RegistryError, ModelError) as error:
        _fail(str(error))
    _announce(result)
    typer.echo(f"champion -> v{result.version} (was v{result.previous})" if result.promoted else result.reason)


@app.command()
def rollback(config: ConfigOption = None, workspace: WorkspaceOption = None,
             reason: Annotated[str, typer.Option(help="Why; recorded on the demoted version.")] = "manual rollback",
             actor: Annotated[str, typer.Option(help="Who rolls back.")] = os.environ.get("USER", "reviewer")) -> None:
    """Move `champion` back to the version it replaced."""
    cfg, ws = _setup(config, workspace)
    from flywheel import registry
    from flywheel.models import ModelError

    try:
        result = registry.rollback(ws.tracking_uri, cfg.model.registered_name, reason=reason, actor=actor,
                                   store=ws.models)
    except (registry.RegistryError, ModelError) as error:
        _fail(str(error))
    _announce(result, rollback=True)
    typer.echo(f"champion -> v{result.version} (rolled back from v{result.previous})")


@app.command()
def export(ref: str, directory: Path, config: ConfigOption = None, workspace: WorkspaceOption = None) -> None:
    """Write a registered version or alias (e.g. `champion`) as a plain Hugging Face model folder."""
    cfg, ws = _setup(config, workspace)
    import shutil

    from flywheel import registry

    try:
        info = registry.get_version(ws.tracking_uri, cfg.model.registered_name, ref)
    except registry.RegistryError as error:
        _fail(str(error))
    from flywheel.models import ModelError

    try:
        source = registry.materialize(ws.tracking_uri, info, ws.models)
    except ModelError as error:  # the stored copy no longer matches its checksums
        _fail(str(error))
    if directory.exists() and any(directory.iterdir()):
        _fail(f"{directory}: exists and is not empty")
    shutil.copytree(source, directory, dirs_exist_ok=True)
    typer.echo(f"v{info.version} -> {directory}")


@app.command()
def lineage(ref: str, config: ConfigOption = None, workspace: WorkspaceOption = None) -> None:
    """Trace a version or alias back to its parent, round, git commit, DVC dataset, recipe, review and metrics."""
    cfg, ws = _setup(config, workspace)
    from flywheel import registry
    from flywheel.lineage import render, trace

    try:
        typer.echo(render(trace(ws, cfg.model.registered_name, ref)))
    except registry.RegistryError as error:
        _fail(str(error))


@app.command()
def generate(ref: Annotated[str, typer.Argument(
                 help="A registered version (3, v3), an alias (champion, candidate) or a model folder.")],
             output: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write, one answer per line.")],
             prompts: Annotated[Optional[Path], typer.Option(
                 help="Prompt file (JSONL/CSV/Parquet); default: the recipe's held-out prompts.")] = None,
             samples: Annotated[int, typer.Option(min=1, max=64, help="Answers per prompt (1: greedy).")] = 1,
             refine: Annotated[int, typer.Option(min=0, max=8, help=(
                 "Self-refinement rounds: the model critiques each answer and rewrites it.")) ] = 0,
             config: ConfigOption = None, workspace: WorkspaceOption = None) -> None:
    """Answer prompts with a model, optionally refining each answer by its own critique (inference-time SELF)."""
    cfg, ws = _setup(config, workspace)
    from flywheel import registry
    from flywheel.models import ModelError
    from flywheel.operations import generate_answers
    from flywheel.prompts import PromptFileError

    if prompts is not None and not prompts.is_file():
        _fail(f"--prompts: file not found: {prompts}")
    from tasks.progress import progress_bar

    try:
        with progress_bar(None, "generate", unit="generation") as advance:
            result = generate_answers(cfg, ws, ref, output, prompts_path=prompts, samples=samples,
                                      refine_rounds=refine, progress=advance)
    except (registry.RegistryError, ModelError, PromptFileError, ValueError) as error:
        _fail(str(error))
    typer.echo(f"{result.answers} answers to {result.prompts} prompts"
               + (f", {result.refined} changed by {refine} refinement round(s)" if refine else "")
               + f": {result.path}")


@app.command(name="eval")
def evaluate(ref: Annotated[str | None, typer.Argument(
                 help="A registered version (3, v3), an alias (champion, candidate) or a model folder.")] = None,
             model: Annotated[str | None, typer.Option("--model", "-m", help="Same as REF.")] = None,
             against: Annotated[str | None, typer.Option(
                 help="Also the win rate against this model (version, alias or folder); default: the champion, "
                      "unless REF is the champion. 'none': no win rate.")] = None,
             judge: Annotated[str, typer.Option(help="Who decides the wins: verifier, self or teacher.")] = "verifier",
             open_ended: Annotated[int, typer.Option(
                 "--open-ended", min=0, help="Also the win rate on N open-ended prompts (evaluation.open_ended_prompts"
                                             "), the judge comparing both answers in both orders; needs --judge "
                                             "self or teacher.")] = 0,
             config: ConfigOption = None, workspace: WorkspaceOption = None) -> None:
    """Score a model on the held-out prompts, as rounds do: prompt- and instruction-level accuracy, strict and loose,
    a table per instruction type, and the win rate against the champion."""
    if (ref is None) == (model is None):
        _fail("name the model once: flywheel eval REF, or flywheel eval --model REF")
    ref = ref or model
    if judge not in ("verifier", "self", "teacher"):
        _fail(f"--judge: unknown judge {judge!r} (verifier, self or teacher)")
    cfg, ws = _setup(config, workspace)
    from flywheel import registry
    from flywheel.judges import JudgeError
    from flywheel.models import ModelError
    from flywheel.operations import evaluate_version

    if against is None:
        against = None if ref == registry.CHAMPION else registry.CHAMPION
    elif against.lower() == "none":
        against = None
    try:
        result = evaluate_version(cfg, ws, ref, against=against, judge=judge, open_ended=open_ended)
    except (registry.RegistryError, ModelError, JudgeError, ValueError) as error:
        _fail(str(error))
    from rich.console import Console
    from rich.table import Table

    scores = result.scores
    what = f"{result.name} v{result.version}" if result.version != "folder" else result.name
    typer.echo(f"{what} ({ref}) on {scores.prompts} held-out prompts")
    table = Table()
    table.add_column("figure")
    table.add_column("strict", justify="right")
    table.add_column("loose", justify="right")

    def loose(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table.add_row("prompt accuracy", f"{scores.prompt_accuracy:.3f}", loose(scores.loose_prompt_accuracy))
    table.add_row("instruction accuracy", f"{scores.constraint_accuracy:.3f}",
                  loose(scores.loose_constraint_accuracy))
    for kind, share in sorted(scores.per_type.items()):
        count = scores.per_type_count.get(kind)
        table.add_row(f"  {kind}" + (f" (n={count})" if count else ""), f"{share:.3f}", "")
    table.add_row("truncated share", f"{scores.truncated_share:.3f}", "")
    table.add_row("answers copying their instructions", str(result.echoed_answers), "")
    table.add_row("answers repeating themselves", str(result.repetitive_answers), "")
    table.add_row("perplexity (probe)", f"{result.perplexity:.2f}", "")
    if result.perplexity_increase_vs_base is not None:
        table.add_row(f"  against the base (v{result.base_version}: {result.base_perplexity:.2f})",
                      f"{result.perplexity_increase_vs_base:+.1%}", "")
    if result.win_rate is not None:
        table.add_row(f"win rate vs {result.against} (v{result.against_version}, {result.win_judge})",
                      f"{result.win_rate:.3f}", "")
    if result.open_ended is not None:
        oe = result.open_ended
        table.add_row(f"open-ended win rate vs {result.against} ({oe.prompts} prompts, {oe.judge}, both orders: "
                      f"{oe.wins} won, {oe.losses} lost, {oe.ties} tied)", f"{oe.win_rate:.3f}", "")
    Console().print(table)
    typer.echo(f"rows: {result.results_path}")
    if result.open_ended_path:
        typer.echo(f"open-ended answers and verdicts: {result.open_ended_path}")


@app.command()
def checkout(round_number: Annotated[int, typer.Option("--round", min=1, help="Round to restore.")],
             config: ConfigOption = None, workspace: WorkspaceOption = None) -> None:
    """Restore data/ to exactly what a round trained on (data.dvc from its tag, then DVC checkout/pull)."""
    _, ws = _setup(config, workspace)
    from flywheel.versioning import VersioningError, checkout_round

    try:
        md5 = checkout_round(ws.root, ws.round_name(round_number))
    except VersioningError as error:
        _fail(str(error))
    typer.echo(f"data/ restored to {ws.round_name(round_number)} (DVC md5 {md5})")


@app.command()
def prune(config: ConfigOption = None, workspace: WorkspaceOption = None,
          refused: Annotated[bool, typer.Option(
              "--refused", help="Also delete the registered weights of candidates that were never champion "
                                "(their versions, tags, metrics and datasets stay).")] = False,
          keep_refused: Annotated[int, typer.Option(
              min=0, help="With --refused: keep the newest N refused candidates' weights.")] = 0,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go and what stays; change nothing.")
                             ] = False,
          wait: WaitOption = False,
          actor: Annotated[str, typer.Option(help="Who prunes; recorded on pruned versions.")
                           ] = os.environ.get("USER", "reviewer")) -> None:
    """Give disk back: copies of weights the registry holds (finished rounds' training outputs, model-store copies
    no alias uses) and, with --refused, refused candidates' registered weights."""
    cfg, ws = _setup(config, workspace)
    from rich.console import Console
    from rich.table import Table

    from flywheel.preflight import size_text
    from flywheel.storage import describe, plan_prune
    from flywheel.storage import prune as prune_workspace
    from flywheel.workspace import WorkspaceBusy

    name = cfg.model.registered_name
    result = None
    try:
        if dry_run:
            plan = plan_prune(ws, name, refused=refused, keep_refused=keep_refused)
        else:
            result = prune_workspace(ws, name, refused=refused, keep_refused=keep_refused, actor=actor, wait=wait)
            plan = result.plan
    except WorkspaceBusy as error:
        _fail(str(error))
    if not plan.items:
        typer.echo("nothing to prune: no round outputs, model-store copies or refused candidates")
        return
    table = Table(title="flywheel prune" + (" (dry run)" if dry_run else ""))
    for column in ("action", "what", "version", "size", "why"):
        table.add_column(column)
    for row in describe(plan.items, ws.root):
        table.add_row(*row)
    Console().print(table)
    if result is None:
        typer.echo(f"would free {size_text(plan.removable_bytes)} ({len(plan.removable)} items)")
    else:
        typer.echo(f"freed {size_text(result.freed_bytes)} ({len(result.removed)} items)")


@app.command()
def review(config: ConfigOption = None, workspace: WorkspaceOption = None,
           run_id: Annotated[Optional[str], typer.Option("--run", help="Paused flow run id (default: the only one).")] = None,
           approve: Annotated[Optional[bool], typer.Option("--approve/--reject", help="The decision.")] = None,
           reviewer: Annotated[str, typer.Option(help="Who decides.")] = os.environ.get("USER", "reviewer"),
           notes: Annotated[str, typer.Option(help="Why.")] = "",
           drop: Annotated[Optional[list[str]], typer.Option(help="Row id to drop (repeatable).")] = None) -> None:
    """List rounds paused for review with their sample; with --approve or --reject, resume one."""
    _, ws = _setup(config, workspace)
    from flywheel.prefect_review import paused_round_name, paused_rounds, resume_round, review_page

    paused = paused_rounds()
    if not paused:
        if approve is not None:  # a decision with nothing to decide on is a mistake, not a no-op
            _fail("no rounds are waiting for review: nothing to approve or reject")
        typer.echo("no rounds are waiting for review")
        return
    if approve is None:
        for item in paused:
            due = f"  decide by {item.expires_at}{' (timed out)' if item.expired else ''}" if item.expires_at else ""
            typer.echo(f"{item.flow_run_id}  {item.name}  paused since {item.paused_at}{due}")
            typer.echo(review_page(item.flow_run_id) or "(no sample published)")
        typer.echo("decide with: flywheel review --run ID --approve|--reject --reviewer NAME [--notes ...] [--drop ROW_ID]")
        return
    if run_id is None:
        if len(paused) > 1:
            _fail("several rounds are paused: choose one with --run ID")
        run_id = str(paused[0].flow_run_id)
    if run_id not in {str(item.flow_run_id) for item in paused}:
        _fail(f"flow run {run_id} is not a round waiting for review (paused: "
              f"{', '.join(str(item.flow_run_id) for item in paused)})")
    round_name = paused_round_name(run_id)
    known = _round_row_ids(ws.rounds_data / round_name) if round_name else None
    try:
        resume_round(run_id, approve=approve, reviewer=reviewer, notes=notes, drop_row_ids=drop or [],
                     known_row_ids=known)
    except ValueError as error:
        _fail(str(error))
    typer.echo(f"{'approved' if approve else 'rejected'} flow run {run_id}")


def _round_row_ids(data_dir: Path) -> set[str]:
    from flywheel.dataset import read_table

    return {str(i) for name in ("pairs", "sft") if (data_dir / f"{name}.parquet").is_file()
            for i in read_table(data_dir / f"{name}.parquet")["row_id"]}


@app.command()
def ui(config: ConfigOption = None, workspace: WorkspaceOption = None,
       prefect_port: int = 4200, mlflow_port: int = 5000) -> None:
    """Start the Prefect and MLflow servers on 127.0.0.1 over this workspace's state, until Ctrl-C."""
    _, ws = _setup(config, workspace)
    import urllib.request

    bin_dir = Path(sys.executable).parent
    ws.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    servers = {
        f"http://127.0.0.1:{prefect_port}": (
            [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
             "--analytics-off"], f"http://127.0.0.1:{prefect_port}/api/health"),
        f"http://127.0.0.1:{mlflow_port}": (
            [str(bin_dir / "mlflow"), "server", "--backend-store-uri", ws.tracking_uri, "--default-artifact-root",
             ws.mlflow_artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(mlflow_port)],
            f"http://127.0.0.1:{mlflow_port}/health"),
    }
    import signal

    def stop(signum, frame):  # a plain `kill` must stop the servers too, not orphan them
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # The UI finds its API from this (else it assumes port 4200, whatever --prefect-port says).
    env = {**os.environ, "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    processes = [subprocess.Popen(cmd, env=env) for cmd, _ in servers.values()]
    try:
        for url, (_, health) in servers.items():
            deadline = time.time() + 240
            while True:
                try:
                    urllib.request.urlopen(health, timeout=2)
                    break
                except OSError:
                    if time.time() > deadline or any(p.poll() is not None for p in processes):
                        _fail(f"server for {url} did not become healthy")
                    time.sleep(1)
        typer.echo(f"Prefect UI: http://127.0.0.1:{prefect_port}\nMLflow UI:  http://127.0.0.1:{mlflow_port}")
        typer.echo(f"To send runs to this server: export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api")
        while all(p.poll() is None for p in processes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _announce(promotion, rollback: bool = False) -> None:
    """With a Prefect server set, a moved champion becomes an event its notifications react to."""
    if promotion.promoted and os.environ.get("PREFECT_API_URL"):  # no Prefect import (seconds) without a server
        from flows.notifications import announce_champion_change

        announce_champion_change(promotion, rollback=rollback)


CronOption = Annotated[Optional[str], typer.Option(help="Cron schedule of the round (default: deployment.cron, nightly).")]


def _require_server(command: str) -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail(f"flywheel {command} needs a Prefect server: start one (`flywheel ui`, or infra/compose.yaml) and set "
              f"PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")


@app.command()
def serve(config: ConfigOption = None, workspace: WorkspaceOption = None, cron: CronOption = None,
          limit: Annotated[Optional[int], typer.Option(min=1, help="Runs executed at once by this process.")] = None,
          notify_url: Annotated[Optional[str], typer.Option(
              envvar="FLYWHEEL_NOTIFY_URL", help="Webhook for failure, review and promotion notifications.")] = None,
          ) -> None:
    """Serve the round (on its schedule), evaluation and promotion deployments from this process until Ctrl-C."""
    cfg, ws = _setup(config, workspace)
    _require_server("serve")
    from flows import deployments

    if notify_url:
        from flows.notifications import install_notifications

        typer.echo("notifications: " + ", ".join(install_notifications(notify_url)))
    try:
        deployments.serve(cfg, str(ws.root), cron=cron, limit=limit)
    except ValueError as error:
        _fail(str(error).splitlines()[0])


@app.command()
def deploy(config: ConfigOption = None, workspace: WorkspaceOption = None, cron: CronOption = None,
           pool: Annotated[Optional[str], typer.Option(help="Work pool (default: deployment.work_pool).")] = None,
           notify_url: Annotated[Optional[str], typer.Option(
               envvar="FLYWHEEL_NOTIFY_URL", help="Webhook for failure, review and promotion notifications.")] = None,
           ) -> None:
    """Register the round, evaluation and promotion deployments with a work pool on the Prefect server (and each
    stage that deployment.stage_pools routes with its own pool)."""
    cfg, ws = _setup(config, workspace)
    _require_server("deploy")
    from flows import deployments

    try:
        names = deployments.deploy(cfg, str(ws.root), cron=cron, work_pool=pool)
    except ValueError as error:
        _fail(str(error).splitlines()[0])
    for name in names:
        typer.echo(f"deployment {name}")
    if notify_url:
        from flows.notifications import install_notifications

        typer.echo("notifications: " + ", ".join(install_notifications(notify_url)))
    for name in deployments.work_pools(cfg, pool):
        typer.echo(f"start a worker with: prefect worker start --pool {name}")


# The exit status of the command, once it has ended on its own terms (see main).
_exit_status: list[int] = []


def main() -> None:
    """The ``flywheel`` console command. Once a command has ended, the process ends right after the exit handlers
    (Prefect's log and event drains, the temporary API's stop, logging's flush) instead of going on to the
    interpreter's teardown of what the command imported: 2.5 s on 2 cores after torch, transformers, Great
    Expectations, MLflow and Prefect, with nothing left to write."""
    import atexit

    atexit.register(_end_process)  # registered before anything the command imports: runs after their handlers
    try:
        app()
    except SystemExit as ending:  # typer ends every command this way; any other exception tears down as usual
        code = ending.code
        _exit_status.append(code if isinstance(code, int) else 0 if code is None else 1)
        raise


def _end_process() -> None:
    if not _exit_status:
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            stream.flush()
    os._exit(_exit_status[0])


if __name__ == "__main__":
    main()
