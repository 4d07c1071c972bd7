"""Training recipes compared on one round's data: which settings move the held-out accuracy, before paying for rounds.

Takes a workspace where a round finished (e.g. the README's scratch round), rebuilds that round's training rows from
its judged samples with a strategy (``--strategy``: best_of_n, repair; the round's own clean rows with ``round``),
trains each variant from the round's champion and scores it on the round's held-out prompts exactly as the round's
evaluate stage does (greedy, strict and loose) plus the general-text perplexity probe that guards promotion. A
rebuilt strategy's rows pass the recipe's quality suites as a round's do (decontamination included); the round's
review gate is not applied.

    .venv/bin/python bench/recipes.py --workspace /tmp/flywheel-scratch [--round 1] [--strategy repair]
        [--recipe configs/default.yaml] --variant 'sft-1e-4={"method": "sft", "learning_rate": 1e-4}' ...

A variant is NAME=JSON: ``training`` fields of the recipe to override (``lora`` as an object). Prints a table (with
the champion's own scores as the first row), writes bench/out/recipes.json and logs the table to MLflow.

``--seeds 0,1,2`` trains every variant once per training seed (the order the rows are trained in) and adds a table of
each variant's mean, lowest and highest instruction accuracy over them: the same round's rows gained +1.7 to +4.3
points on four seeds (bench/README.md), so a difference between variants smaller than that spread says nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=JSON")
    try:
        overrides = json.loads(spec)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--variant {name}: not JSON ({error})") from None
    if not isinstance(overrides, dict):
        raise SystemExit(f"--variant {name}: expected a JSON object of training fields")
    return name, overrides


def training_tables(config, strategy: str, record: dict, gx_root: Path) -> dict[str, list[dict]]:
    """The round's rows for each method's table ("pairs" for DPO, "sft" otherwise), built once for all variants.

    Rebuilt rows pass the recipe's quality suites as the round's do (in a GX context under ``gx_root``), so rows
    that share a long n-gram with a held-out prompt, or that the gate quarantines for any other reason, are not
    trained on; the quarantined counts are printed."""
    from flywheel.dataset import read_table
    from flywheel.prompts import load_prompts
    from flywheel.stages import PromptSplit, gate_tables
    from flywheel.strategies import build_strategy_data

    if strategy == "round":
        clean = record["quality"]["clean"]
        return {table: read_table(Path(clean[f"{table}_path"])).to_dict(orient="records") for table in ("pairs", "sft")}
    split = PromptSplit(**record["prompts"])
    samples = read_table(Path(record["judged"]["path"]))
    recipe = config.model_copy(update={"strategy": config.strategy.model_copy(update={"name": strategy})})
    made = build_strategy_data(recipe, load_prompts(Path(split.train_path)), samples, champion_dir=Path("."),
                               base_dir=ROOT, device="cpu")
    outcome = gate_tables(recipe, gx_root, {"samples": samples, "pairs": made.pairs, "sft": made.sft}, split,
                          build_data_docs=False)
    for table in ("pairs", "sft"):  # the quarantine keeps its columns when empty
        dropped = int((outcome.quarantine["table"] == table).sum())
        print(f"{strategy} {table}: {len(outcome.clean[table])} rows pass the quality gate, {dropped} quarantined",
              flush=True)
    return {table: outcome.clean[table].to_dict(orient="records") for table in ("pairs", "sft")}


def score(config, model_dir: Path, split, state_dir: Path) -> dict:
    from flywheel.evaluation import summarize
    from flywheel.probe import perplexity
    from flywheel.prompts import load_prompts
    from flywheel.stages import greedy_eval

    scores = summarize(greedy_eval(config, model_dir, load_prompts(Path(split.eval_path)), None, state_dir))
    return {"prompt_acc": scores.prompt_accuracy, "instr_acc": scores.constraint_accuracy,
            "loose_instr_acc": scores.loose_constraint_accuracy, "truncated": scores.truncated_share,
            "mean_tokens": scores.mean_tokens, "perplexity": perplexity(model_dir), "per_type": scores.per_type}


def parse_seeds(text: str | None, default: int) -> list[int]:
    if text is None:
        return [default]
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per variant, in first-seen order: how many seeds, and the mean, lowest and highest instruction accuracy and
    their gain over the champion (the row without a seed)."""
    champion = next(row["instr_acc"] for row in rows if row.get("seed") is None)
    by_variant: dict[str, list[float]] = {}
    for row in rows:
        if row.get("seed") is not None:
            by_variant.setdefault(row["variant"], []).append(row["instr_acc"])
    return [{"variant": name, "seeds": len(accs), "mean": sum(accs) / len(accs), "low": min(accs),
             "high": max(accs), "mean_gain": sum(accs) / len(accs) - champion, "spread": max(accs) - min(accs)}
            for name, accs in by_variant.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--strategy", choices=["round", "best_of_n", "repair"], default="repair")
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON training overrides (repeatable)")
    parser.add_argument("--seeds", help="training seeds, comma-separated (default: the recipe's seed)")
    args = parser.parse_args()
    if not args.variant:
        raise SystemExit("give at least one --variant NAME=JSON")
    variants = dict(parse_variant(v) for v in args.variant)

    from flywheel import registry
    from flywheel.config import TrainingConfig, load_config
    from flywheel.stages import PromptSplit
    from flywheel.training import train
    from flywheel.workspace import Workspace

    config = load_config(args.recipe)
    seeds = parse_seeds(args.seeds, config.seed)
    workspace = Workspace.from_config(config, args.workspace)
    record_path = workspace.records / f"round-{args.round:04d}.json"
    if not record_path.is_file():
        raise SystemExit(f"no finished round {args.round} in {args.workspace} ({record_path} is missing)")
    record = json.loads(record_path.read_text())
    split = PromptSplit(**record["prompts"])
    # The round's champion, from the model store (fetched again if `flywheel prune` removed the store's copy).
    champion = registry.materialize(workspace.tracking_uri, registry.get_version(
        workspace.tracking_uri, config.model.registered_name, str(record["parent_version"])), workspace.models)
    load = common.machine_load()
    rows_out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="flywheel-recipes-") as scratch:
        tables = training_tables(config, args.strategy, record, Path(scratch) / "gx")
        state = Path(scratch) / "state"
        rows_out.append({"variant": f"champion v{record['parent_version']}", "rows": None, "steps": None,
                         "train_s": None, **score(config, champion, split, state)})
        for name, overrides in variants.items():
            training = TrainingConfig.model_validate({**config.training.model_dump(), **overrides,
                                                      "checkpoint_steps": 0})
            rows = tables["pairs" if training.method == "dpo" else "sft"]
            for seed in seeds:
                started = time.perf_counter()
                model_dir = Path(scratch) / name
                trained = train(champion, rows, training, model_dir, seed=seed)
                row = {"variant": name, "seed": seed, "rows": len(rows), "steps": trained.steps,
                       "train_s": time.perf_counter() - started, **score(config, model_dir, split, state)}
                rows_out.append(row)
                shutil.rmtree(model_dir)
                print(f"{name} (seed {seed}): instruction accuracy {row['instr_acc']:.3f}, "
                      f"perplexity {row['perplexity']:.2f}", flush=True)
    base_ppl = rows_out[0]["perplexity"]
    for row in rows_out:
        row["ppl_increase"] = row["perplexity"] / base_ppl - 1
    common.print_table(rows_out, [
        ("variant", "variant", ""), ("seed", "seed", ""), ("rows", "rows", ""), ("steps", "steps", ""),
        ("train_s", "train s", ".0f"),
        ("prompt_acc", "prompt acc", ".3f"), ("instr_acc", "instr acc", ".3f"),
        ("loose_instr_acc", "loose instr", ".3f"), ("truncated", "truncated", ".2f"),
        ("ppl_increase", "perplexity vs champion", "+.1%"),
    ])
    summary = seed_summary(rows_out)
    if len(seeds) > 1:
        common.print_table(summary, [
            ("variant", "variant", ""), ("seeds", "seeds", ""), ("mean", "mean instr acc", ".3f"),
            ("low", "lowest", ".3f"), ("high", "highest", ".3f"), ("mean_gain", "mean vs champion", "+.3f"),
            ("spread", "spread", ".3f"),
        ])
    print(common.load_note(load))
    data = {"workspace": str(args.workspace), "round": args.round, "strategy": args.strategy,
            "variants": variants, "seeds": seeds, "rows": rows_out, "seed_summary": summary, "load": load}
    path = common.write_json("recipes", data)
    common.log_to_mlflow("recipes", [{k: v for k, v in r.items() if k != "per_type"} for r in rows_out],
                         {"workspace": args.workspace, "round": args.round, "strategy": args.strategy,
                          "seeds": ",".join(map(str, seeds)), "variants": json.dumps(variants, default=str)}, [path])


if __name__ == "__main__":
    main()
