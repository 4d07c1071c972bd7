"""How many SFT rows of one instruction type the real default model needs before its greedy held-out answers meet it,
and what its answers look like then.

A round of the default recipe holds 5-7 all-capitals rows among its 80, and ``all_uppercase`` stays at 0.00 on the
held-out prompts round after round (bench/README.md). This separates "too few rows" from "not learnable here": the
base model answers the training split's prompts that carry ``--type`` (greedy, the recipe's token limit), the type's
repair fix (``flywheel.repair.repair``, that type only) turns each answer into a target that meets it, and the
recipe's SFT (its learning rate, epochs, KL anchor, batch) trains a copy of the base on N of those rows plus plain
rows (the base's own answers to prompts without the type) up to ``--total`` rows. Each trained model then answers
all the held-out prompts as a round's evaluation does (``flywheel.stages.greedy_eval``: the recipe's evaluation
engine, batch and token limit, judged by the verifiers): how many of the type's prompts meet it, the instruction
accuracy over all of them (what the type's rows cost elsewhere), and how many answers are degenerate repetitions (the
recipe's quality check, ``flywheel.evaluation.repetitive_answers``).

Prints a Markdown table; writes bench/out/teachability.json and bench/out/teachability.png; logs them to MLflow
(see bench/common.py). About 6 minutes a trained model on 2 cores.

    .venv/bin/python bench/teachability.py [--type all_uppercase] [--rows 7,28,84] [--total 80] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def _has(prompt, kind: str) -> bool:
    return any(c.type == kind for c in prompt.constraints)


def _greedy(model_dir: Path, prompts, max_new_tokens: int, batch_size: int) -> list[str]:
    """The base's greedy answers to the training prompts: what the repairs and plain rows are made of."""
    from flywheel.generation import SamplingParams, TransformersEngine, user_request

    engine = TransformersEngine(model_dir, batch_size=batch_size)
    done = engine.generate([user_request(p.prompt) for p in prompts], 1, SamplingParams(max_new_tokens=max_new_tokens))
    return [c.text for c in sorted(done, key=lambda c: c.request_index)]


def held_out_scores(judged, kind: str, limits) -> dict:
    """One model's figures from its judged held-out table (``greedy_eval``'s): the type's prompts that meet it and
    their count, instruction accuracy over every type, answers repeating themselves (all, and the type's), and the
    first answer to a prompt with the type."""
    from flywheel.evaluation import repetitive_answers, summarize

    checks = judged["checks"].map(json.loads)
    typed = judged[checks.map(lambda c: kind in c)]
    return {"met": sum(bool(c[kind]) for c in checks if kind in c), "held_out": len(typed),
            "accuracy": summarize(judged).constraint_accuracy,
            "repetitive": repetitive_answers(typed, limits), "repetitive_all": repetitive_answers(judged, limits),
            "answers": len(judged), "example": typed["response"].iloc[0][:160] if len(typed) else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--type", default="all_uppercase", dest="kind")
    parser.add_argument("--rows", default="7,28,84", help="rows of the type per trained model (comma-separated)")
    parser.add_argument("--total", type=int, default=80, help="plain rows fill each training set up to this")
    parser.add_argument("--eval-limit", type=int, default=None, help="default: the recipe's prompts.eval_limit")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    from flywheel.config import load_config
    from flywheel.prompts import default_prompts, split_prompts
    from flywheel.repair import FIXERS, repair
    from flywheel.quality import text_limits
    from flywheel.stages import greedy_eval
    from flywheel.training import train

    config = load_config(common.ROOT / args.config)
    if args.kind not in FIXERS:
        parser.error(f"--type {args.kind!r} has no repair fix; types with one: {', '.join(FIXERS)}")
    counts = sorted({int(n) for n in args.rows.split(",")})
    limits = text_limits(config.quality)
    pool = default_prompts(config.prompts.seed, config.prompts.builtin_count)
    train_split, held = split_prompts(pool, config.prompts.eval_fraction, config.prompts.seed)
    held = held[:args.eval_limit or config.prompts.eval_limit]
    typed = [p for p in train_split if _has(p, args.kind)]
    plain = [p for p in train_split if not _has(p, args.kind)][:args.total]
    if max(counts) > len(typed):
        parser.error(f"--rows asks for {max(counts)} rows of {args.kind}; the training split has {len(typed)} prompts")
    base = common.real_model()
    gen = config.generation
    print(f"{args.kind}: {len(typed)} training prompts, {sum(_has(p, args.kind) for p in held)} of {len(held)} "
          "held-out prompts; answering the training prompts with the base")
    answers = _greedy(base, typed + plain, gen.max_new_tokens, gen.batch_size)
    targets = [repair([c for c in p.constraints if c.type == args.kind], a, types=[args.kind])
               for p, a in zip(typed, answers)]
    typed_rows = [{"prompt": p.prompt, "completion": t, "ended": True} for p, t in zip(typed, targets)]
    plain_rows = [{"prompt": p.prompt, "completion": a, "ended": True}
                  for p, a in zip(plain, answers[len(typed):])]

    with tempfile.TemporaryDirectory(prefix="flywheel-teach-") as scratch:
        state = Path(scratch) / "state"  # the evaluation engine's caches
        rows = [{"type_rows": 0, "plain_rows": 0, "steps": 0, "train_s": 0.0,
                 **held_out_scores(greedy_eval(config, base, held, None, state), args.kind, limits)}]
        for n in counts:
            data = typed_rows[:n] + plain_rows[:max(0, args.total - n)]
            random.Random(config.seed).shuffle(data)
            started = time.perf_counter()
            model = train(base, data, config.training, Path(scratch) / f"n{n}", seed=config.seed)
            seconds = time.perf_counter() - started
            judged = greedy_eval(config, Path(model.path), held, None, state)
            rows.append({"type_rows": n, "plain_rows": len(data) - n, "steps": model.steps, "train_s": seconds,
                         **held_out_scores(judged, args.kind, limits)})
            print(f"{n} rows of {args.kind}: {rows[-1]['met']}/{rows[-1]['held_out']} met, instruction accuracy "
                  f"{rows[-1]['accuracy']:.3f}, {rows[-1]['repetitive_all']} of {len(held)} answers repetitive")
    table = common.print_table(rows, [
        ("type_rows", f"{args.kind} rows", ""), ("plain_rows", "plain rows", ""), ("steps", "steps", ""),
        ("train_s", "train s", ".0f"), ("met", "held-out met", ""), ("held_out", "of", ""),
        ("repetitive", "of those repetitive", ""), ("accuracy", "instruction accuracy (all)", ".3f"),
        ("repetitive_all", "repetitive (all)", ""), ("example", "first answer with the type", ""),
    ])
    path = common.write_json("teachability", {"type": args.kind, "config": args.config, "rows": rows,
                                              "machine": common.cpu_model(), "table": table})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["type_rows"] for r in rows]
    ax.plot(xs, [r["met"] / r["held_out"] for r in rows], "o-", label=f"held-out answers meeting {args.kind}")
    ax.plot(xs, [r["repetitive"] / r["held_out"] for r in rows], "s--", label="of those, repeating themselves")
    ax.plot(xs, [r["accuracy"] for r in rows], "d-.", label="instruction accuracy, all held-out prompts")
    ax.set_xlabel(f"{args.kind} rows among the training rows (plain rows fill to {args.total})")
    ax.set_ylabel(f"share ({rows[0]['held_out']} held-out prompts with the type, {len(held)} in all)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Teaching {args.kind} to the default model with the default SFT")
    plot = common.save_figure(fig, common.OUT / "teachability.png")
    if not args.no_mlflow:
        common.log_to_mlflow("teachability", rows, {"type": args.kind, "rows": args.rows, "total": args.total,
                                                    "config": args.config}, [path, plot])


if __name__ == "__main__":
    main()
