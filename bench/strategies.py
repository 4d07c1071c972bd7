"""Strategies compared: rounds of each strategy's recipe from the same base model, on the default CPU setup.

For every strategy, a fresh scratch workspace runs ``--rounds`` rounds of its recipe in ``configs/`` (each round
starts from the champion the last one left) and the table reports, per round: the held-out prompt-level and
instruction-level accuracy (strict and loose) of the round's candidate and of the base, whether it was promoted, the
judge agreement, the rows the strategy produced, and the round's wall time; and the model served after each round
(the last promoted candidate) against the base on the same held-out prompts: its instruction-level gain with a 95%
interval and a sign test, so a gain can be told from noise. Writes bench/out/strategies.json and
bench/out/strategies.png and logs the table to MLflow.

    .venv/bin/python bench/strategies.py [--rounds 3] [--strategies best_of_n spar ...]
                                         [--prompts 64] [--eval-limit 48] [--max-new-tokens 96]
                                         [--builtin-prompts 1024]

``--prompts``, ``--eval-limit``, ``--max-new-tokens`` and ``--builtin-prompts`` override the recipes (smaller:
faster, noisier); ``--set section.field=value`` (repeatable, the value read as YAML) overrides any other field, to
measure a variant of a recipe without writing one (``--set training.kl_weight=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RECIPES = {
    "best_of_n": "best-of-n.yaml",
    "repair": "default.yaml",
    "self_refine": "self-refine.yaml",
    "spar": "spar.yaml",
    "sami": "sami.yaml",
    "distill": "distill.yaml",
    "grpo": "grpo.yaml",
}


def recipe_for(strategy: str, workspace: Path, args: argparse.Namespace) -> Path:
    """The strategy's shipped recipe with the benchmark's size overrides, written into the scratch workspace."""
    data = yaml.safe_load((ROOT / "configs" / RECIPES[strategy]).read_text())
    prompts = data.setdefault("prompts", {})
    if args.prompts:
        prompts["per_round"] = args.prompts
    if args.eval_limit:
        prompts["eval_limit"] = args.eval_limit
    if args.builtin_prompts:
        prompts["builtin_count"] = args.builtin_prompts
    if args.max_new_tokens:
        data.setdefault("generation", {})["max_new_tokens"] = args.max_new_tokens
        data.setdefault("evaluation", {})["max_new_tokens"] = args.max_new_tokens
    apply_overrides(data, args.set)
    path = workspace / f"bench-{strategy}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """``section.field=value`` items into the recipe's nested mapping; the value is read as YAML (numbers, lists,
    null). The round's config loader checks the result, so a misspelt field fails the first round, loudly."""
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise SystemExit(f"--set {item!r}: expected section.field=value")
        *sections, field = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {item!r}: {section} is not a section")
        node[field] = yaml.safe_load(value)


def run_round(recipe: Path, workspace: Path) -> float:
    env = dict(os.environ, FLYWHEEL_WORKSPACE=str(workspace))
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    common.run_child([sys.executable, "-m", "flywheel.cli", "run", "--config", str(recipe), "--workspace",
                      str(workspace)], env=env, cwd=workspace)
    return time.perf_counter() - started


def round_row(strategy: str, number: int, workspace: Path, seconds: float) -> dict:
    record = json.loads((workspace / ".flywheel" / "rounds" / f"round-{number:04d}.json").read_text())
    evaluation = record["evaluation"]
    candidate, champion = evaluation["candidate"], evaluation["champion"]
    clean = record["quality"]["clean"]
    promotion = record.get("promotion") or {}
    return {
        "strategy": strategy, "round": number, "seconds": seconds,
        "prompt_acc": candidate["prompt_accuracy"], "instr_acc": candidate["constraint_accuracy"],
        "loose_prompt_acc": candidate.get("loose_prompt_accuracy"),
        "loose_instr_acc": candidate.get("loose_constraint_accuracy"),
        "champion_prompt_acc": champion["prompt_accuracy"], "champion_instr_acc": champion["constraint_accuracy"],
        "win_rate": evaluation["win_rate"], "promoted": bool(promotion.get("promoted")),
        "agreement": record["judged"].get("agreement"), "pass_rate": record["judged"]["pass_rate"],
        "pairs": clean["pairs"], "sft": clean["sft"], "quarantined": record["quality"]["quarantined"],
        "train_steps": (record.get("trained") or {}).get("steps"),
        "generate_s": (record.get("generations") or {}).get("seconds"),
        "train_s": (record.get("trained") or {}).get("seconds"),
        "perplexity": evaluation.get("candidate_perplexity"),
        "perplexity_vs_champion": _relative(evaluation.get("candidate_perplexity"),
                                            evaluation.get("champion_perplexity")),
        "perplexity_vs_base": _relative(evaluation.get("candidate_perplexity"), evaluation.get("base_perplexity")),
        # Held-out answers that copy their instructions or repeat themselves (None in records made before them).
        "copies": evaluation.get("candidate_echoes"), "loops": evaluation.get("candidate_repetitive"),
        # What the flywheel serves after this round: the candidate if promoted, else the champion it was measured
        # against (the target is about this model, not the last candidate).
        "served_instr_acc": candidate["constraint_accuracy"] if promotion.get("promoted")
        else champion["constraint_accuracy"],
    }


def served_against_base(workspace: Path, rounds: int) -> list[dict]:
    """For each round, the served model's held-out answers against the base's, paired on the same prompts: the
    instruction-level gain with its 95% interval and sign test (flywheel.evaluation.paired_gain). The served model
    is the last promoted candidate; the base's answers are round 1's champion table."""
    from flywheel.dataset import read_table
    from flywheel.evaluation import compare

    work = workspace / ".flywheel" / "work"
    base = read_table(work / "round-0001" / "eval_champion.parquet")
    served, estimates = base, []
    for number in range(1, rounds + 1):
        record = json.loads((workspace / ".flywheel" / "rounds" / f"round-{number:04d}.json").read_text())
        if (record.get("promotion") or {}).get("promoted"):
            served = read_table(work / f"round-{number:04d}" / "eval_candidate.parquet")
        gain = compare(served, base).instruction_gain
        estimates.append({"served_gain_vs_base": gain.gain, "served_gain_ci_low": gain.ci_low,
                          "served_gain_ci_high": gain.ci_high, "served_gain_p": gain.p_value})
    return estimates


def served_per_type(strategy: str, workspace: Path, rounds: int) -> list[dict]:
    """Per instruction type, the base's and the served model's held-out accuracy after the last round, and the
    difference in instructions met (share difference x instructions of the type): where a strategy's gain comes
    from and what it costs. Types are ordered by that difference, gains first."""
    records = [json.loads((workspace / ".flywheel" / "rounds" / f"round-{n:04d}.json").read_text())
               for n in range(1, rounds + 1)]
    base = records[0]["evaluation"]["champion"]
    served = base
    for record in records:
        if (record.get("promotion") or {}).get("promoted"):
            served = record["evaluation"]["candidate"]
    counts = base.get("per_type_count") or {}
    rows = [{"strategy": strategy, "type": name, "instructions": counts.get(name, 0),
             "base": base["per_type"][name], "served": served["per_type"].get(name, float("nan")),
             "met_difference": counts.get(name, 0) * (served["per_type"].get(name, 0.0) - base["per_type"][name])}
            for name in base["per_type"]]
    return sorted(rows, key=lambda row: (-row["met_difference"], row["type"]))


def _relative(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference - 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--prompts", type=int, default=0, help="prompts per round (0: the recipe's)")
    parser.add_argument("--eval-limit", type=int, default=0, help="held-out prompts scored (0: the recipe's)")
    parser.add_argument("--builtin-prompts", type=int, default=0,
                        help="synthesized prompt pool (0: the recipe's); 1024 holds out about 256, so --eval-limit "
                             "192 scores four times the default's 48 held-out prompts (a superset of them)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="answer length (0: the recipe's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a recipe field (repeatable), e.g. --set promotion.gain_metric=instruction")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/flywheel-bench-strategies"))
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    if args.workspace.resolve() == ROOT or ROOT in args.workspace.resolve().parents:
        raise SystemExit("use a scratch workspace outside the project checkout")

    load_before = common.machine_load()
    rows: list[dict] = []
    per_type: list[dict] = []
    base: dict[str, float] = {}
    for strategy in args.strategies:
        workspace = args.workspace / strategy
        if workspace.exists():
            shutil.rmtree(workspace)
        workspace.mkdir(parents=True)
        # Every strategy starts from the same provisioned base (the dequantized GGUF, converted once).
        models = common.OUT / "models"
        if models.is_dir():
            shutil.copytree(models, workspace / ".flywheel" / "models", dirs_exist_ok=True)
        recipe = recipe_for(strategy, workspace, args)
        for number in range(1, args.rounds + 1):
            print(f"== {strategy}: round {number} of {args.rounds}", flush=True)
            seconds = run_round(recipe, workspace)
            row = round_row(strategy, number, workspace, seconds)
            if number == 1:
                base = {"prompt_acc": row["champion_prompt_acc"], "instr_acc": row["champion_instr_acc"]}
            rows.append(row)
        for row, served in zip(rows[-args.rounds:], served_against_base(workspace, args.rounds)):
            row.update(served)
        per_type += served_per_type(strategy, workspace, args.rounds)
        # A run keeps every candidate's weights (3-7 GB over 3 rounds) unless the recipe prunes them, e.g.
        # --set storage.prune_after_round=refused: refused candidates' weights go, their records stay.
        print(f"{strategy}: workspace {workspace} holds {common.disk_usage(workspace) / 2**30:.1f} GiB", flush=True)
    for row in rows:
        row["instr_gain_vs_base"] = row["instr_acc"] - base["instr_acc"] if base else None
    load_after = common.machine_load()

    print()
    text = common.print_table(rows, [
        ("strategy", "strategy", ""), ("round", "round", "d"), ("prompt_acc", "prompt acc", ".3f"),
        ("instr_acc", "instr acc", ".3f"), ("loose_instr_acc", "instr acc (loose)", ".3f"),
        ("instr_gain_vs_base", "instr vs base", "+.3f"), ("win_rate", "win rate", ".3f"),
        ("promoted", "promoted", ""), ("served_instr_acc", "champion instr acc", ".3f"),
        ("served_gain_vs_base", "champion vs base", "+.3f"), ("served_gain_ci_low", "95% CI low", "+.3f"),
        ("served_gain_ci_high", "95% CI high", "+.3f"), ("served_gain_p", "p (sign test)", ".3f"),
        ("perplexity", "probe ppl", ".2f"), ("perplexity_vs_champion", "ppl vs champion", "+.1%"),
        ("perplexity_vs_base", "ppl vs base", "+.1%"), ("copies", "copying answers", ""),
        ("loops", "looping answers", ""),
        ("agreement", "judge agreement", ".3f"), ("pass_rate", "sample pass", ".3f"),
        ("pairs", "pairs", "d"), ("sft", "sft rows", "d"), ("quarantined", "quarantined", "d"),
        ("generate_s", "generate s", ".0f"), ("train_s", "train s", ".0f"), ("seconds", "wall s", ".0f"),
    ])
    print("\nServed model after the last round against the base, per instruction type (held-out, strict):")
    type_table = common.print_table(per_type, [
        ("strategy", "strategy", ""), ("type", "instruction type", ""), ("instructions", "instructions", "d"),
        ("base", "base", ".2f"), ("served", "served", ".2f"), ("met_difference", "met vs base", "+.1f"),
    ])
    print(f"\nbase model: prompt acc {base.get('prompt_acc', float('nan')):.3f}, "
          f"instruction acc {base.get('instr_acc', float('nan')):.3f} (strict)")
    print(f"load: before {common.load_note(load_before)}; after {common.load_note(load_after)}")
    settings = {"rounds": args.rounds, "prompts": args.prompts or "recipe", "eval_limit": args.eval_limit or "recipe",
                "builtin_prompts": args.builtin_prompts or "recipe",
                "max_new_tokens": args.max_new_tokens or "recipe", "overrides": args.set}
    path = common.write_json("strategies", {"settings": settings, "base": base, "rows": rows, "table": text,
                                            "per_type": per_type, "per_type_table": type_table,
                                            "load": {"before": load_before, "after": load_after}})
    plot = plot_rows(rows, base)
    print(f"wrote {path} and {plot}")
    if not args.no_mlflow:
        run_id = common.log_to_mlflow("strategies", rows, {**settings, "strategies": args.strategies,
                                                           "load_before": load_before, "load_after": load_after},
                                      [path, plot])
        print(f"logged MLflow run {run_id} in experiment {common.EXPERIMENT}")


def plot_rows(rows: list[dict], base: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, title in (("instr_acc", axes[0], "instruction-level accuracy (strict)"),
                           ("prompt_acc", axes[1], "prompt-level accuracy (strict)")):
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            mine = [r for r in rows if r["strategy"] == strategy]
            (line,) = ax.plot([0] + [r["round"] for r in mine], [base.get(key, 0.0)] + [r[key] for r in mine],
                              marker="o", label=strategy)
            # A candidate the gate refused is drawn hollow: the next round trains from the older champion.
            refused = [r for r in mine if not r.get("promoted")]
            ax.plot([r["round"] for r in refused], [r[key] for r in refused], linestyle="none", marker="o",
                    markersize=9, markerfacecolor="white", markeredgecolor=line.get_color())
        if key == "instr_acc" and "instr_acc" in base:
            ax.axhline(base["instr_acc"] + 0.10, color="grey", linestyle="--", linewidth=1)
            ax.annotate("base + 10 points", (0, base["instr_acc"] + 0.10), textcoords="offset points",
                        xytext=(2, 3), fontsize=8, color="grey")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round (0: base; hollow: not promoted)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("held-out accuracy of each round's candidate")
    return common.save_figure(fig, common.OUT / "strategies.png")


if __name__ == "__main__":
    main()
