"""How many SFT rows of one instruction type the real default model needs before its greedy held-out answers meet it,
and what its answers look like then.

A round of the default recipe holds 5-7 all-capitals rows among its 80, and ``all_uppercase`` stays at 0.00 on the
held-out prompts round after round (bench/README.md). This separates "too few rows" from "not learnable here": the
base model answers the training split's prompts that carry ``--type`` (greedy, the recipe's token limit), the type's
repair fix (``flywheel.repair.repair``, that type only) turns each answer into a target that meets it, and the
recipe's SFT (its learning rate, epochs, KL anchor, batch) trains a copy of the base on N of those rows plus plain
rows (the base's own answers to prompts without the type) up to ``--total`` rows. Each trained model then answers
the held-out prompts with the type, greedy: how many meet it, and how many answers are degenerate repetitions (the
recipe's quality check: a word n-gram more often than ``quality.repetition_max_repeats``).

Prints a Markdown table; writes bench/out/teachability.json and bench/out/teachability.png; logs them to MLflow
(see bench/common.py). About 5 minutes a trained model on 2 cores.

    .venv/bin/python bench/teachability.py [--type all_uppercase] [--rows 7,28,84] [--total 80] [--no-mlflow]
"""

from __future__ import annotations

import argparse
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
    from flywheel.generation import SamplingParams, TransformersEngine, user_request

    engine = TransformersEngine(model_dir, batch_size=batch_size)
    done = engine.generate([user_request(p.prompt) for p in prompts], 1, SamplingParams(max_new_tokens=max_new_tokens))
    return [c.text for c in sorted(done, key=lambda c: c.request_index)]


def _score(prompts, answers: list[str], kind: str, limits) -> dict:
    from flywheel.textchecks import is_repetitive

    met = sum(next(c for c in p.constraints if c.type == kind).check(a, strict=True) for p, a in zip(prompts, answers))
    return {"met": met, "repetitive": sum(is_repetitive(a, limits) for a in answers), "held_out": len(prompts),
            "example": answers[0][:160] if answers else ""}


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
    from flywheel.training import train

    config = load_config(common.ROOT / args.config)
    if args.kind not in FIXERS:
        parser.error(f"--type {args.kind!r} has no repair fix; types with one: {', '.join(FIXERS)}")
    counts = sorted({int(n) for n in args.rows.split(",")})
    limits = text_limits(config.quality)
    pool = default_prompts(config.prompts.seed, config.prompts.builtin_count)
    train_split, held = split_prompts(pool, config.prompts.eval_fraction, config.prompts.seed)
    held = [p for p in held[:args.eval_limit or config.prompts.eval_limit] if _has(p, args.kind)]
    typed = [p for p in train_split if _has(p, args.kind)]
    plain = [p for p in train_split if not _has(p, args.kind)][:args.total]
    if max(counts) > len(typed):
        parser.error(f"--rows asks for {max(counts)} rows of {args.kind}; the training split has {len(typed)} prompts")
    base = common.real_model()
    gen = config.generation
    print(f"{args.kind}: {len(typed)} training prompts, {len(held)} held out; answering them with the base")
    answers = _greedy(base, typed + plain, gen.max_new_tokens, gen.batch_size)
    targets = [repair([c for c in p.constraints if c.type == args.kind], a, types=[args.kind])
               for p, a in zip(typed, answers)]
    typed_rows = [{"prompt": p.prompt, "completion": t, "ended": True} for p, t in zip(typed, targets)]
    plain_rows = [{"prompt": p.prompt, "completion": a, "ended": True}
                  for p, a in zip(plain, answers[len(typed):])]

    rows = [{"type_rows": 0, "plain_rows": 0, "steps": 0, "train_s": 0.0,
             **_score(held, _greedy(base, held, config.evaluation.max_new_tokens, 32), args.kind, limits)}]
    with tempfile.TemporaryDirectory(prefix="flywheel-teach-") as scratch:
        for n in counts:
            data = typed_rows[:n] + plain_rows[:max(0, args.total - n)]
            random.Random(config.seed).shuffle(data)
            started = time.perf_counter()
            model = train(base, data, config.training, Path(scratch) / f"n{n}", seed=config.seed)
            seconds = time.perf_counter() - started
            answers_n = _greedy(Path(model.path), held, config.evaluation.max_new_tokens, 32)
            rows.append({"type_rows": n, "plain_rows": len(data) - n, "steps": model.steps, "train_s": seconds,
                         **_score(held, answers_n, args.kind, limits)})
            print(f"{n} rows of {args.kind}: {rows[-1]['met']}/{len(held)} met, {rows[-1]['repetitive']} repetitive")
    table = common.print_table(rows, [
        ("type_rows", f"{args.kind} rows", ""), ("plain_rows", "plain rows", ""), ("steps", "steps", ""),
        ("train_s", "train s", ".0f"), ("met", "held-out met", ""), ("repetitive", "repetitive", ""),
        ("held_out", "held out", ""), ("example", "first held-out answer", ""),
    ])
    path = common.write_json("teachability", {"type": args.kind, "config": args.config, "rows": rows,
                                              "machine": common.cpu_model(), "table": table})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["type_rows"] for r in rows]
    ax.plot(xs, [r["met"] / r["held_out"] for r in rows], "o-", label=f"held-out answers meeting {args.kind}")
    ax.plot(xs, [r["repetitive"] / r["held_out"] for r in rows], "s--", label="held-out answers repeating themselves")
    ax.set_xlabel(f"{args.kind} rows among the training rows (plain rows fill to {args.total})")
    ax.set_ylabel(f"share of {len(held)} held-out prompts")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Teaching {args.kind} to the default model with the default SFT")
    plot = common.save_figure(fig, common.OUT / "teachability.png")
    if not args.no_mlflow:
        common.log_to_mlflow("teachability", rows, {"type": args.kind, "rows": args.rows, "total": args.total,
                                                    "config": args.config}, [path, plot])


if __name__ == "__main__":
    main()
