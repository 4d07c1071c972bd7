"""Scaling of one round with its size: wall time and peak memory against the number of prompts, and the DVC
storage consecutive rounds use.

For each size in ``--prompts`` a fresh scratch workspace runs one round of ``--config`` with ``prompts.per_round``
set to that size; one more run doubles ``samples_per_prompt`` at ``--double-samples-at`` prompts. Per run: the
round process's wall time, its peak memory (see ``common.run_measured``: the kernel's high-water mark of the largest
process, and the sampled sum over its process tree), the samples and tokens generated and the generation seconds
(from the round record), and the time of each stage as Prefect recorded it. Then ``--rounds-for-storage``
consecutive rounds at ``--storage-prompts`` prompts share one workspace (its first round is the scaling run of
that size, when there is one) and, after each, the table records the disk used by the workspace's DVC cache, the
DVC remote the round pushed to and the checked-out ``data/``.

The builtin prompt pool has 256 prompts, of which about 192 are training prompts (``eval_fraction`` 0.25), and
``per_round`` beyond the training prompts silently means all of them: when a size needs more, every run uses one
larger pool synthesized by ``flywheel.prompts.synthesize_prompts`` with the recipe's seed (the builtin pool is its
prefix), written as a JSONL file and set as ``prompts.source``.

Prints Markdown tables; writes bench/out/scaling.json, bench/out/scaling.md and bench/out/scaling.png; logs them to
MLflow (see bench/common.py).

    .venv/bin/python bench/scaling.py [--config configs/default.yaml] [--prompts 32,64,128,256]
        [--samples N] [--max-new-tokens N] [--eval-limit N] [--double-samples-at 64]
        [--rounds-for-storage 3] [--storage-prompts 64] [--workspace /tmp/flywheel-bench-scaling]

A reduced run: ``--prompts 8,16 --max-new-tokens 16 --eval-limit 8 --rounds-for-storage 2``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

MIB = 2**20


# --- recipes ------------------------------------------------------------------------------------------------------

def base_recipe(path: Path) -> dict:
    """The recipe as a dict, validated, with checkout-relative paths made absolute (the rounds run elsewhere)."""
    from flywheel.config import parse_config

    data = yaml.safe_load(path.read_text()) or {}
    parse_config(data, str(path))
    for section, key in (("prompts", "source"), ("model", "base")):
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (ROOT / value).exists():
            data[section][key] = str(ROOT / value)
    return data


def prompt_pool(recipe: dict, largest: int, scratch: Path) -> tuple[str | None, str]:
    """(prompts.source to set or None, a description): the recipe's pool when it has ``largest`` training prompts,
    else, for the builtin pool, a larger synthesized one; a recipe's own file that is too small is an error."""
    from flywheel.config import parse_config
    from flywheel.prompts import load_prompts, save_prompts, split_prompts, synthesize_prompts

    prompts = parse_config(recipe).prompts
    if prompts.source != "builtin":
        train, _ = split_prompts(load_prompts(Path(prompts.source)), prompts.eval_fraction, seed=prompts.seed)
        if len(train) < largest:
            raise SystemExit(f"{prompts.source}: {len(train)} training prompts, fewer than the largest size "
                             f"{largest}; pass smaller --prompts or a larger prompt file")
        return None, f"{prompts.source} ({len(train)} training prompts)"
    from flywheel.prompts import DEFAULT_PROMPT_COUNT

    count = DEFAULT_PROMPT_COUNT
    while True:
        pool = synthesize_prompts(count, prompts.seed)
        train, _ = split_prompts(pool, prompts.eval_fraction, seed=prompts.seed)
        if len(train) >= largest:
            break
        count += max(64, math.ceil((largest - len(train)) / (1 - prompts.eval_fraction)))
    if count == DEFAULT_PROMPT_COUNT:
        return None, f"builtin ({len(train)} training prompts)"
    path = scratch / f"prompts-{count}-seed{prompts.seed}.jsonl"
    save_prompts(pool, path)
    return str(path), f"synthesized {count} prompts, {len(train)} for training (builtin pool: {DEFAULT_PROMPT_COUNT})"


def write_recipe(recipe: dict, workspace: Path, per_round: int, samples: int, source: str | None,
                 args: argparse.Namespace) -> Path:
    data = json.loads(json.dumps(recipe))  # a deep copy
    data["name"] = f"{data.get('name', 'recipe')}-p{per_round}-s{samples}"
    prompts = data.setdefault("prompts", {})
    prompts["per_round"] = per_round
    if source:
        prompts["source"] = source
    if args.eval_limit:
        prompts["eval_limit"] = args.eval_limit
    generation = data.setdefault("generation", {})
    generation["samples_per_prompt"] = samples
    if args.max_new_tokens:
        generation["max_new_tokens"] = args.max_new_tokens
        data.setdefault("evaluation", {})["max_new_tokens"] = args.max_new_tokens
    # Nothing pruned: the storage series measures what each round leaves, and what each prune mode would remove.
    data.setdefault("storage", {}).update(prune_after_round="off", keep_refused=0)
    path = workspace / "bench-scaling.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- one round ----------------------------------------------------------------------------------------------------

def fresh_workspace(path: Path, recipe: dict) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    base = (recipe.get("model") or {}).get("base", "")
    provisioned = common.OUT / "models" / "base" / base.removeprefix("builtin:")
    if base.startswith("builtin:") and provisioned.is_dir():
        # The builtin base is provisioned once (bench/common.real_model), not by every run: provisioning is not
        # what this benchmark measures.
        shutil.copytree(provisioned, path / ".flywheel" / "models" / "base" / provisioned.name)
    return path


def round_env(workspace: Path) -> dict[str, str]:
    """Everything of the round in its workspace: its own Prefect home, MLflow database and DVC remote."""
    env = dict(os.environ, PREFECT_HOME=str(workspace / ".flywheel" / "prefect"), FLYWHEEL_WORKSPACE=str(workspace),
               PYTHONUNBUFFERED="1")
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "FLYWHEEL_DVC_REMOTE", "FLYWHEEL_FAULT_POINT"):
        env.pop(key, None)
    return env


def run_round(recipe: Path, workspace: Path, number: int) -> dict:
    log = workspace / f"bench-round-{number:04d}.log"
    measured = common.run_measured(
        [sys.executable, "-m", "flywheel.cli", "run", "--config", str(recipe), "--workspace", str(workspace)],
        env=round_env(workspace), cwd=workspace, log=log)
    if measured["returncode"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        print(f"   round {number} in {workspace} exited {measured['returncode']}: " + " / ".join(tail), flush=True)
    return measured


def round_record(workspace: Path, number: int) -> dict | None:
    path = workspace / ".flywheel" / "rounds" / f"round-{number:04d}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stage_seconds(workspace: Path) -> dict[str, float]:
    """Seconds of each stage of the workspace's last round, as Prefect recorded them (bench/round.py's reader, in a
    child process: Prefect reads its home once, at import)."""
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from round import stage_times; times = stage_times(Path(sys.argv[2])); "
            "print(json.dumps({'stages': times.stages, 'flow': times.flow_seconds}))")
    result = subprocess.run([sys.executable, "-c", code, str(BENCH), str(workspace)], env=round_env(workspace),
                            capture_output=True, text=True)
    if result.returncode != 0:
        # The error's own line: Prefect's temporary server logs its shutdown after the traceback.
        lines = [line for line in result.stderr.strip().splitlines()
                 if line.strip() and not re.match(r"\d\d:\d\d:\d\d\.\d+ \| ", line)]
        print(f"   stage times unavailable for {workspace}: {(lines or ['?'])[-1]}")
        return {}
    data = json.loads(result.stdout.strip().splitlines()[-1])
    seconds: dict[str, float] = {"flow": data["flow"]}
    for name, value in data["stages"]:
        seconds[name] = seconds.get(name, 0.0) + value
    return seconds


def scaling_row(label: str, prompts: int, samples_per_prompt: int, workspace: Path, measured: dict,
                stages: dict[str, float]) -> dict:
    record = round_record(workspace, 1)
    row = {"run": label, "prompts": prompts, "samples_per_prompt": samples_per_prompt,
           "status": record["status"] if record else f"failed (exit {measured['returncode']})",
           "returncode": measured["returncode"],
           "round_s": measured["seconds"], "peak_rss_mib": measured["peak_rss_mib"],
           "peak_tree_rss_mib": measured["peak_tree_rss_mib"], "stages": stages,
           "generate_task_s": stages.get("generate"), "train_s": stages.get("train"),
           "evaluate_s": stages.get("evaluate"), "flow_s": stages.get("flow")}
    if record:
        generations = record["generations"]
        row.update(samples=generations["samples"], tokens=generations["tokens"], generate_s=generations["seconds"],
                   tokens_per_s=generations["tokens_per_second"], pairs=record["quality"]["clean"]["pairs"])
    return row


def weights_on_disk(workspace: Path, recipe: Path) -> dict:
    """Weights the rounds left (the model store, its provisioned base aside, and MLflow's artifacts), and what would
    be left after `flywheel prune` (copies) and `flywheel prune --refused`, from the plans those would carry out."""
    import dataclasses

    from flywheel.config import load_config
    from flywheel.storage import plan_prune
    from flywheel.workspace import Workspace

    config = load_config(recipe, base_dir=workspace)
    ws = Workspace.from_config(config, workspace)
    ws = dataclasses.replace(ws, tracking_uri=f"sqlite:///{ws.state / 'mlflow.db'}")  # never the caller's server
    base = common.disk_usage(ws.models / "base")
    total = common.disk_usage(ws.models) - base + common.disk_usage(ws.mlflow_artifacts)
    # One plan serves both: `--refused` removes what the plain prune does, plus the registered weights it lists.
    removable = plan_prune(ws, config.model.registered_name, refused=True).removable
    copies = sum(item.size for item in removable if item.kind != "registered_weights")
    return {"weights_mib": total / MIB, "after_prune_mib": (total - copies) / MIB,
            "after_prune_refused_mib": (total - sum(item.size for item in removable)) / MIB}


def storage_row(workspace: Path, number: int, measured: dict, recipe: Path) -> dict:
    record = round_record(workspace, number) or {}
    remote = (record.get("dataset") or {}).get("remote") or ""
    if not remote:  # a rejected round versions nothing; the remote is where the DVC config says
        remote = str(workspace / ".flywheel" / "dvc-remote")
    return {"round": number, "status": record.get("status", f"failed (exit {measured['returncode']})"),
            "round_s": measured["seconds"],
            "dvc_cache_mib": common.disk_usage(workspace / ".dvc" / "cache") / MIB,
            "dvc_remote_mib": common.disk_usage(Path(remote)) / MIB if "://" not in remote else None,
            "data_mib": common.disk_usage(workspace / "data") / MIB,
            "samples": ((record.get("generations") or {}).get("samples")), "remote": remote,
            **weights_on_disk(workspace, recipe)}


# --- fits and plot ------------------------------------------------------------------------------------------------

def fits(rows: list[dict]) -> dict:
    """Least squares of seconds against samples generated: the generation seconds through the origin (generation
    has no fixed cost in the record's figure), the round's wall time affine (model loading, evaluation of the fixed
    held-out set and the services' start-up are fixed costs)."""
    done = [r for r in rows if r.get("samples")]
    if len(done) < 2:
        return {}
    import numpy as np

    x = np.array([r["samples"] for r in done], dtype=float)
    generate = np.array([r["generate_s"] for r in done], dtype=float)
    wall = np.array([r["round_s"] for r in done], dtype=float)
    per_sample = float(x @ generate / (x @ x))
    slope, intercept = (float(v) for v in np.polyfit(x, wall, 1))

    def r2(y, predicted):
        total = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - predicted) ** 2).sum()) / total if total > 0 else float("nan")

    return {"generate_s_per_sample": per_sample, "generate_r2": r2(generate, per_sample * x),
            "round_s_per_sample": slope, "round_fixed_s": intercept, "round_r2": r2(wall, slope * x + intercept)}


def _storage_bars(ax, storage: list[dict], series: tuple[tuple[str, str], ...], divisor: float, ylabel: str,
                  title: str) -> None:
    import numpy as np

    rounds = np.array([s["round"] for s in storage], dtype=float)
    for offset, (key, label) in zip((-0.27, 0.0, 0.27), series):
        ax.bar(rounds + offset, [(s[key] or 0) / divisor for s in storage], width=0.27, label=label)
    ax.set_xticks(rounds)
    ax.set_xlabel("rounds finished")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def plot(rows: list[dict], storage: list[dict], fit: dict, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = 4 if storage else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    done = [r for r in rows if r.get("samples")]
    ax = axes[0]
    if done:
        x = np.array([r["samples"] for r in done], dtype=float)
        ax.scatter(x, [r["round_s"] for r in done], color="#4472c4", label="round (process wall time)")
        ax.scatter(x, [r["generate_s"] for r in done], color="#ed7d31", label="generation (record)")
        for r in done:
            ax.annotate(r["run"], (r["samples"], r["round_s"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if fit:
            line = np.linspace(0, x.max() * 1.05, 50)
            ax.plot(line, fit["round_fixed_s"] + fit["round_s_per_sample"] * line, color="#4472c4", alpha=0.6,
                    label=f"{fit['round_fixed_s']:.0f} s + {fit['round_s_per_sample']:.2f} s/sample "
                          f"(R² {fit['round_r2']:.3f})")
            ax.plot(line, fit["generate_s_per_sample"] * line, color="#ed7d31", alpha=0.6,
                    label=f"{fit['generate_s_per_sample']:.2f} s/sample (R² {fit['generate_r2']:.3f})")
    ax.set_xlabel("samples generated (prompts x samples per prompt)")
    ax.set_ylabel("seconds")
    ax.set_title("time against work")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    for key, color, label in (("peak_rss_mib", "#4472c4", "largest process (kernel high-water mark)"),
                              ("peak_tree_rss_mib", "#a5a5a5", "process tree (sampled sum)")):
        base = [r for r in rows if r["samples_per_prompt"] == rows[0]["samples_per_prompt"]]
        ax.plot([r["prompts"] for r in base], [r[key] for r in base], marker="o", color=color, label=label)
        more = [r for r in rows if r not in base]
        if more:
            ax.scatter([r["prompts"] for r in more], [r[key] for r in more], marker="s", color=color,
                       label=f"{label}, {more[0]['samples_per_prompt']} samples/prompt")
    ax.set_xlabel("prompts per round")
    ax.set_ylabel("peak resident memory (MiB)")
    ax.set_title("peak memory against prompts")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    if storage:
        _storage_bars(axes[2], storage, (("dvc_cache_mib", "DVC cache"), ("dvc_remote_mib", "DVC remote"),
                                         ("data_mib", "data/ (checked out)")), 1, "MiB on disk",
                      "storage after each round")
        _storage_bars(axes[3], storage, (("weights_mib", "as the rounds left them"),
                                         ("after_prune_mib", "after flywheel prune"),
                                         ("after_prune_refused_mib", "after prune --refused")), 1024,
                      "GiB of model weights (store + MLflow artifacts)", "weights after each round")
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, common.OUT / "scaling.png")


# --- main ---------------------------------------------------------------------------------------------------------

def sizes(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--prompts: positive integers separated by commas, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--prompts", type=sizes, default=[32, 64, 128, 256], help="prompts per round, one run each")
    parser.add_argument("--samples", type=int, default=0, help="samples per prompt (0: the recipe's)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="answer length (0: the recipe's)")
    parser.add_argument("--eval-limit", type=int, default=0, help="held-out prompts scored (0: the recipe's)")
    parser.add_argument("--double-samples-at", type=int, default=-1,
                        help="prompts of the run with twice the samples per prompt (-1: the recipe's per_round, "
                             "0: no such run)")
    parser.add_argument("--rounds-for-storage", type=int, default=3, help="consecutive rounds for the storage "
                                                                          "figures (0: none)")
    parser.add_argument("--storage-prompts", type=int, default=0, help="prompts per storage round (0: the "
                                                                       "recipe's per_round)")
    parser.add_argument("--no-stage-times", action="store_true", help="skip reading stage times from Prefect")
    parser.add_argument("--keep-workspaces", action="store_true", help="keep each scaling run's workspace")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/flywheel-bench-scaling"))
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    scratch = args.workspace.resolve()
    if scratch == ROOT or ROOT in scratch.parents:
        raise SystemExit("use a scratch workspace outside the project checkout")
    from flywheel.config import parse_config

    recipe = base_recipe(args.config)
    config = parse_config(recipe)
    samples = args.samples or config.generation.samples_per_prompt
    double_at = config.prompts.per_round if args.double_samples_at < 0 else args.double_samples_at
    storage_prompts = args.storage_prompts or config.prompts.per_round
    marker = scratch / ".flywheel-bench-scaling"
    if scratch.exists() and any(scratch.iterdir()) and not marker.is_file():
        raise SystemExit(f"{scratch} exists and is not this benchmark's scratch folder: pass another --workspace")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    marker.write_text("scratch folder of bench/scaling.py: deleted by its next run\n")
    if (recipe.get("model") or {}).get("base", "").startswith("builtin:"):
        common.real_model()  # provisioned once under bench/out/models, then linked into every workspace
    largest = max([*args.prompts, double_at, storage_prompts if args.rounds_for_storage else 0])
    source, pool = prompt_pool(recipe, largest, scratch)
    print(f"prompt pool: {pool}", flush=True)

    runs = [(f"p{n}", n, samples) for n in args.prompts]
    if double_at:
        runs.append((f"p{double_at} x2 samples", double_at, 2 * samples))
    storage_home = next((label for label, n, s in runs if n == storage_prompts and s == samples), None)
    load_before = common.machine_load()
    rows: list[dict] = []
    for label, prompts, per_prompt in runs:
        workspace = fresh_workspace(scratch / label.replace(" ", "-"), recipe)
        recipe_path = write_recipe(recipe, workspace, prompts, per_prompt, source, args)
        print(f"== {label}: {prompts} prompts x {per_prompt} samples", flush=True)
        measured = run_round(recipe_path, workspace, 1)
        stages = {} if args.no_stage_times or measured["returncode"] else stage_seconds(workspace)
        rows.append(scaling_row(label, prompts, per_prompt, workspace, measured, stages))
        print(f"   {measured['seconds']:.0f} s, peak {measured['peak_rss_mib']:.0f} MiB", flush=True)
        if not args.keep_workspaces and not (label == storage_home and args.rounds_for_storage):
            shutil.rmtree(workspace)

    storage: list[dict] = []
    if args.rounds_for_storage:
        if storage_home is not None:
            # Round 1 of the storage series is the scaling run of that size; its workspace was left as it ended.
            workspace = scratch / storage_home
            first = next(r for r in rows if r["run"] == storage_home)
            recipe_path = write_recipe(recipe, workspace, storage_prompts, samples, source, args)
            storage.append(storage_row(workspace, 1, {"seconds": first["round_s"], "returncode": first["returncode"]},
                                       recipe_path))
        else:
            workspace = fresh_workspace(scratch / f"storage-p{storage_prompts}", recipe)
            recipe_path = write_recipe(recipe, workspace, storage_prompts, samples, source, args)
        failed = any(s["status"].startswith("failed") for s in storage)
        for number in range(len(storage) + 1, 0 if failed else args.rounds_for_storage + 1):
            print(f"== storage: round {number} of {args.rounds_for_storage} ({storage_prompts} prompts)", flush=True)
            measured = run_round(recipe_path, workspace, number)
            storage.append(storage_row(workspace, number, measured, recipe_path))
            if measured["returncode"]:
                break  # the next round would resume this one, not add a round's data
    load_after = common.machine_load()

    fit = fits(rows)
    print()
    text = common.print_table(rows, [
        ("run", "run", ""), ("prompts", "prompts", "d"), ("samples_per_prompt", "samples/prompt", "d"),
        ("samples", "samples", "d"), ("tokens", "tokens", "d"), ("status", "status", ""),
        ("round_s", "round s", ".0f"), ("generate_s", "generate s", ".1f"), ("tokens_per_s", "tokens/s", ".1f"),
        ("train_s", "train s", ".1f"), ("evaluate_s", "evaluate s", ".1f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"), ("peak_tree_rss_mib", "tree RSS MiB", ".0f"),
    ])
    if fit:
        summary = (f"\nround: {fit['round_fixed_s']:.1f} s + {fit['round_s_per_sample']:.3f} s per sample "
                   f"(R² {fit['round_r2']:.3f}); generation: {fit['generate_s_per_sample']:.3f} s per sample "
                   f"(through the origin, R² {fit['generate_r2']:.3f})")
        print(summary)
        text += "\n" + summary
    if storage:
        print()
        text += "\n\n" + common.print_table(storage, [
            ("round", "rounds", "d"), ("status", "status", ""), ("samples", "samples", "d"),
            ("round_s", "round s", ".0f"), ("dvc_cache_mib", "DVC cache MiB", ".2f"),
            ("dvc_remote_mib", "DVC remote MiB", ".2f"), ("data_mib", "data/ MiB", ".2f"),
            ("weights_mib", "weights MiB", ".0f"), ("after_prune_mib", "after prune MiB", ".0f"),
            ("after_prune_refused_mib", "after prune --refused MiB", ".0f"),
        ])
    notes = f"prompt pool: {pool}\nload: before {common.load_note(load_before)}; after {common.load_note(load_after)}"
    print("\n" + notes)
    text += "\n\n" + notes

    settings = {"config": str(args.config), "prompts": args.prompts, "samples_per_prompt": samples,
                "double_samples_at": double_at, "max_new_tokens": args.max_new_tokens or "recipe",
                "eval_limit": args.eval_limit or "recipe", "rounds_for_storage": args.rounds_for_storage,
                "storage_prompts": storage_prompts, "prompt_pool": pool}
    path = common.write_json("scaling", {"settings": settings, "rows": rows, "fit": fit, "storage": storage,
                                         "table": text, "load": {"before": load_before, "after": load_after}})
    markdown = common.OUT / "scaling.md"
    markdown.write_text(text + "\n")
    figure = plot(rows, storage, fit, f"{args.config.name}: one round per size, {samples} samples per prompt")
    print(f"wrote {path}, {markdown} and {figure}")
    if not args.no_mlflow:
        metrics = {**fit, **{f"{r['run'].replace(' ', '_')}.{k}": r[k] for r in rows
                             for k in ("round_s", "peak_rss_mib", "peak_tree_rss_mib") if r.get(k) is not None}}
        run_id = common.log_to_mlflow("scaling", [{k: v for k, v in r.items() if k != "stages"} for r in rows],
                                      {**settings, "load_before": load_before, "load_after": load_after},
                                      [path, markdown, figure], metrics=metrics)
        print(f"logged MLflow run {run_id} in experiment {common.EXPERIMENT}")


if __name__ == "__main__":
    main()
