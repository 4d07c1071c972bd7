"""Tests for flywheel.quality: the GX-backed quality gate of a round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flywheel.quality import (
    QUARANTINE_COLUMNS,
    QualityGateError,
    QualityOutcome,
    enforce,
    normalize_prompt,
    run_quality_gate,
)

MIN_CHARS = 3
MAX_CHARS = 40
EVAL_PROMPTS = ["What is the capital of France?", "eval   prompt two"]

NOT_NULL = "expect_column_values_to_not_be_null"
LENGTHS = "expect_column_value_lengths_to_be_between"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
NOT_IN_SET = "expect_column_values_to_not_be_in_set"


# --------------------------------------------------------------------------- builders


def sample(row_id: str, **kw) -> dict:
    row = {
        "row_id": row_id,
        "prompt_id": "p1",
        "prompt": "Add two numbers.",
        "sample_index": 0,
        "response": "def add(a, b): return a + b",
        "n_tokens": 12,
        "finished": True,
        "score": 0.75,
        "passed": True,
    }
    row.update(kw)
    return row


def pair(row_id: str, **kw) -> dict:
    row = {
        "row_id": row_id,
        "prompt_id": "p1",
        "prompt": f"Prompt for {row_id}",
        "chosen": "a good answer",
        "rejected": "a bad answer",
        "chosen_score": 0.9,
        "rejected_score": 0.1,
    }
    row.update(kw)
    return row


def sft_row(row_id: str, **kw) -> dict:
    row = {
        "row_id": row_id,
        "prompt_id": "p1",
        "prompt": f"Prompt for {row_id}",
        "completion": "a fine completion",
        "score": 1.0,
    }
    row.update(kw)
    return row


def clean_tables() -> dict[str, pd.DataFrame]:
    return {
        "samples": pd.DataFrame(
            [sample("s1"), sample("s2", sample_index=1, score=0.0, passed=False)]
        ),
        "pairs": pd.DataFrame([pair("p1"), pair("p2")]),
        "sft": pd.DataFrame([sft_row("f1"), sft_row("f2")]),
    }


def gate(root: Path, tables, *, max_failed_fraction: float = 1.0, **kw) -> QualityOutcome:
    return run_quality_gate(
        root,
        tables,
        eval_prompts=EVAL_PROMPTS,
        min_chars=MIN_CHARS,
        max_chars=MAX_CHARS,
        max_failed_fraction=max_failed_fraction,
        **kw,
    )


def reasons_by_row(outcome: QualityOutcome, table: str) -> dict[str, set[str]]:
    q = outcome.quarantine
    q = q[q["table"] == table]
    return {rid: set(reasons.split("; ")) for rid, reasons in zip(q["row_id"], q["reasons"])}


# --------------------------------------------------------------------------- clean / empty


def test_clean_tables_pass(tmp_path: Path) -> None:
    root = tmp_path / "great_expectations"
    tables = clean_tables()
    out = gate(root, tables, max_failed_fraction=0.0)

    assert out.report.passed
    assert out.report.total_rows == 6 and out.report.failed_rows == 0
    assert out.report.failed_fraction == 0.0
    assert all(t.success and t.failed_rows == 0 for t in out.report.tables)
    assert list(out.quarantine.columns) == list(QUARANTINE_COLUMNS)
    assert out.quarantine.empty
    for name, df in tables.items():
        pd.testing.assert_frame_equal(out.clean[name], df)
    enforce(out.report)  # does not raise

    # Suites are stored in the file context (versioned); GX wrote only under the root.
    for name in ("samples", "pairs", "sft"):
        assert (root / "expectations" / f"flywheel_{name}.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["great_expectations"]
    assert out.report.data_docs_path is not None
    docs = Path(out.report.data_docs_path)
    assert docs.name == "index.html" and docs.is_file()
    assert root.resolve() in docs.resolve().parents


def test_empty_tables_pass(tmp_path: Path) -> None:
    tables = {
        "samples": pd.DataFrame(),  # no columns at all
        "pairs": pd.DataFrame(columns=list(pair("x"))),
        "sft": pd.DataFrame([sft_row("f1")]).iloc[0:0],
    }
    out = gate(tmp_path / "great_expectations", tables, max_failed_fraction=0.0)
    assert out.report.passed
    assert out.report.total_rows == 0 and out.report.failed_fraction == 0.0
    assert out.quarantine.empty
    assert set(out.clean) == {"samples", "pairs", "sft"}
    assert all(df.empty for df in out.clean.values())
    assert list(out.clean["pairs"].columns) == list(pair("x"))
    assert len(out.report.validation_result_ids) == 3


# --------------------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def failing(tmp_path_factory) -> tuple[QualityOutcome, dict[str, pd.DataFrame], Path]:
    samples = pd.DataFrame(
        [
            sample("s_ok1"),
            sample("s_ok2", response="abc"),  # exactly min_chars
            sample("s_null", response=None),
            sample("s_short", response="xy"),
            sample("s_long", response="y" * (MAX_CHARS + 1)),
            sample("s_hi", score=1.5),
            sample("s_lo", score=-0.1),
            sample("s_two", response="x", score=2.0),
        ]
    )
    pairs = pd.DataFrame(
        [
            pair("p_ok"),
            pair("p_same", chosen="same text", rejected="same text"),
            pair("p_dup1", prompt="dup prompt"),
            pair("p_dup2", prompt="dup prompt"),
            pair("p_eval", prompt="  what IS the\tcapital of   FRANCE? "),
            pair("p_null", chosen=None),
            pair("p_rscore", rejected_score=1.2),
        ]
    )
    sft = pd.DataFrame(
        [
            sft_row("f_ok"),
            sft_row("f_eval", prompt="Eval Prompt\nTwo"),
            sft_row("f_dup1", prompt="same", completion="same completion"),
            sft_row("f_dup2", prompt="same", completion="same completion"),
            sft_row("f_long", completion="z" * 100),
            sft_row("f_noscore", score=None),
        ]
    )
    tables = {"samples": samples, "pairs": pairs, "sft": sft}
    root = tmp_path_factory.mktemp("failing") / "great_expectations"
    return gate(root, tables), tables, root


EXPECTED = {
    "samples": {
        "s_null": {f"{NOT_NULL}(response)"},
        "s_short": {f"{LENGTHS}(response)"},
        "s_long": {f"{LENGTHS}(response)"},
        "s_hi": {f"{BETWEEN}(score)"},
        "s_lo": {f"{BETWEEN}(score)"},
        "s_two": {f"{LENGTHS}(response)", f"{BETWEEN}(score)"},
    },
    "pairs": {
        "p_same": {f"{IN_SET}(chosen_equals_rejected)"},
        "p_dup2": {f"{IN_SET}(duplicate_prompt_chosen_rejected)"},
        "p_eval": {f"{NOT_IN_SET}(prompt_normalized)"},
        "p_null": {f"{NOT_NULL}(chosen)"},
        "p_rscore": {f"{BETWEEN}(rejected_score)"},
    },
    "sft": {
        "f_eval": {f"{NOT_IN_SET}(prompt_normalized)"},
        "f_dup2": {f"{IN_SET}(duplicate_prompt_completion)"},
        "f_long": {f"{LENGTHS}(completion)"},
        "f_noscore": {f"{NOT_NULL}(score)"},
    },
}


@pytest.mark.parametrize("table", ["samples", "pairs", "sft"])
def test_each_failure_kind_quarantines_exactly_its_rows(failing, table: str) -> None:
    out, tables, _ = failing
    assert reasons_by_row(out, table) == EXPECTED[table]

    # Clean = input minus quarantined rows, original columns only, index reset.
    clean = out.clean[table]
    expected_clean = tables[table][~tables[table]["row_id"].isin(EXPECTED[table])]
    pd.testing.assert_frame_equal(clean, expected_clean.reset_index(drop=True))
    assert list(clean.columns) == list(tables[table].columns)

    report = next(t for t in out.report.tables if t.table == table)
    assert report.rows == len(tables[table])
    assert report.failed_rows == len(EXPECTED[table])
    assert not report.success


def test_row_failing_two_expectations_appears_once(failing) -> None:
    out, _, _ = failing
    q = out.quarantine
    assert q["row_id"].is_unique  # row_ids are unique across these tables
    (reasons,) = q.loc[q["row_id"] == "s_two", "reasons"]
    assert reasons == f"{LENGTHS}(response); {BETWEEN}(score)"
    samples = next(t for t in out.report.tables if t.table == "samples")
    counts = {(o.expectation, o.column): o.unexpected_count for o in samples.expectations}
    assert counts[(LENGTHS, "response")] == 3  # s_short, s_long, s_two (null is skipped)
    assert counts[(BETWEEN, "score")] == 3
    assert counts[(NOT_NULL, "response")] == 1
    assert out.report.failed_rows == sum(len(v) for v in EXPECTED.values())
    assert out.report.total_rows == 21


def test_quarantine_keeps_the_original_row(failing) -> None:
    out, tables, _ = failing
    q = out.quarantine.set_index("row_id")
    row = json.loads(q.loc["p_null", "row_json"])
    assert row == {**pair("p_null"), "chosen": None}
    row = json.loads(q.loc["f_noscore", "row_json"])
    assert row["score"] is None and row["prompt"] == "Prompt for f_noscore"
    assert set(q.loc[["s_hi", "p_eval", "f_dup2"], "table"]) == {"samples", "pairs", "sft"}
    # Derived columns never leak into the quarantined row.
    assert "prompt_normalized" not in json.loads(q.loc["p_eval", "row_json"])


def test_gx_results_are_stored_in_the_context(failing) -> None:
    import great_expectations as gx
    from great_expectations.data_context.types.resource_identifiers import (
        ValidationResultIdentifier,
    )

    out, _, root = failing
    ids = out.report.validation_result_ids
    assert len(ids) == 3
    assert all(out.report.gx_run_id in i for i in ids)
    for result_id in ids:
        assert (root / "uncommitted" / "validations" / f"{result_id}.json").is_file()

    # A later reader re-opens the context and finds the result by the reported id.
    ctx = gx.get_context(mode="file", context_root_dir=str(root))
    pairs_id = next(i for i in ids if i.startswith("flywheel_pairs/"))
    stored = ctx.validation_results_store.get(
        ValidationResultIdentifier.from_tuple(tuple(pairs_id.split("/")))
    )
    assert not stored.success
    failed = {
        item["row_id"]
        for r in stored.results
        if not r.success
        for item in r.result["unexpected_index_list"]
    }
    assert failed == set(EXPECTED["pairs"])


# --------------------------------------------------------------------------- the bound


def test_gate_bound_and_enforce(tmp_path: Path) -> None:
    root = tmp_path / "great_expectations"
    rows = [sample(f"s{i}") for i in range(9)] + [sample("bad", score=3.0)]
    tables = {"samples": pd.DataFrame(rows)}

    ok = gate(root, tables, max_failed_fraction=0.2, build_data_docs=False)
    assert ok.report.passed and ok.report.failed_fraction == pytest.approx(0.1)
    assert ok.report.data_docs_path is None
    enforce(ok.report)
    assert len(ok.clean["samples"]) == 9 and list(ok.quarantine["row_id"]) == ["bad"]

    over = gate(root, tables, max_failed_fraction=0.05, build_data_docs=False)
    assert not over.report.passed
    with pytest.raises(QualityGateError) as info:
        enforce(over.report)
    msg = str(info.value)
    assert "1 of 10 rows failed" in msg
    assert "10.00%" in msg and "5.00%" in msg
    assert f"samples: {BETWEEN}(score) x1" in msg
    assert info.value.report is over.report


def test_expectation_that_cannot_run_fails_the_gate(tmp_path: Path) -> None:
    tables = {"samples": pd.DataFrame([sample("a", score="high"), sample("b")])}
    out = gate(tmp_path / "great_expectations", tables, build_data_docs=False)
    assert out.report.failed_fraction == 0.0  # no row could be blamed ...
    assert not out.report.passed  # ... but an unchecked column is not a pass
    assert out.report.errors and f"{BETWEEN}(score)" in out.report.errors[0]
    with pytest.raises(QualityGateError, match="could not be evaluated"):
        enforce(out.report)


def test_running_twice_on_the_same_root(tmp_path: Path) -> None:
    root = tmp_path / "great_expectations"
    first = gate(root, clean_tables(), run_name="round-1")
    versioned = {
        p: p.read_bytes()
        for p in root.rglob("*.json")
        if "uncommitted" not in p.parts
    }
    versioned[root / "great_expectations.yml"] = (root / "great_expectations.yml").read_bytes()
    tables = clean_tables()
    tables["pairs"] = pd.DataFrame([pair("p1"), pair("p2", chosen="x")])  # too short
    second = gate(root, tables, run_name="round-2")

    assert first.report.passed and first.report.gx_run_id == "round-1"
    assert second.report.gx_run_id == "round-2"
    assert list(second.quarantine["row_id"]) == ["p2"]
    both = first.report.validation_result_ids + second.report.validation_result_ids
    assert len(set(both)) == 6
    for result_id in both:
        assert (root / "uncommitted" / "validations" / f"{result_id}.json").is_file()
    # Re-running leaves the versioned suites/checkpoints/config byte-identical.
    for path, content in versioned.items():
        assert path.read_bytes() == content, path


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("tables", "kw", "match"),
    [
        ({"pairs": pd.DataFrame([pair("a")]).drop(columns=["rejected"])}, {}, "lacks column"),
        ({"sft": pd.DataFrame([sft_row("a"), sft_row("a")])}, {}, "duplicate row_id"),
        ({"sft": pd.DataFrame([sft_row(None)])}, {}, "null row_id"),
        ({"other": pd.DataFrame()}, {}, "unknown tables"),
        ({"sft": pd.DataFrame([sft_row("a", prompt_normalized="x")])}, {}, "derived column"),
        ({}, {"min_chars": 10, "max_chars": 5}, "min_chars"),
        ({}, {"max_failed_fraction": 1.5}, "max_failed_fraction"),
        ({}, {"run_name": "a/b"}, "run_name"),
    ],
)
def test_invalid_inputs_raise_before_touching_gx(tmp_path: Path, tables, kw, match) -> None:
    root = tmp_path / "great_expectations"
    args = {
        "eval_prompts": [],
        "min_chars": 1,
        "max_chars": 10,
        "max_failed_fraction": 0.5,
        **kw,
    }
    with pytest.raises(ValueError, match=match):
        run_quality_gate(root, tables, **args)
    assert not root.exists()


def test_normalize_prompt() -> None:
    assert normalize_prompt("  What IS\tthe\n capital? ") == "what is the capital?"
    assert normalize_prompt(None) is None


def test_module_import_is_light() -> None:
    code = (
        "import sys, flywheel.quality; "
        "bad = [m for m in ('great_expectations', 'pandas') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
