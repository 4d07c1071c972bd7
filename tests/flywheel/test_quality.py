"""Tests for flywheel.quality: the GX-backed quality gate of a round."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flywheel.config import QualityConfig
from flywheel.quality import (
    DERIVED_COLUMNS,
    KINDS,
    QUARANTINE_COLUMNS,
    REQUIRED_COLUMNS,
    QualityGateError,
    QualityOutcome,
    enforce,
    make_offline,
    normalize_prompt,
    run_quality_gate,
    share_observations,
)

EVAL_PROMPTS = [
    "What is the capital of France?",
    "eval   prompt two",
    "Describe the water cycle in detail for a class of ten year old students please.",
]
# Bounds small enough to plant rows against; every share limit open (shares have their own tests).
SETTINGS = QualityConfig(
    min_chars=3, max_chars=400, min_tokens=1, max_tokens=60, language="en", language_min_letters=60,
    repetition_ngram=3, repetition_max_repeats=3, decontamination_ngram=8, quarantine_truncated=True,
    max_refusal_share=1.0, max_repetition_share=1.0, max_truncated_share=1.0, max_failed_fraction=1.0,
)
RUSSIAN = "Это предложение написано на русском языке и совсем не подходит для английского набора данных."
REFUSAL = "I'm sorry, but I can't help with that."
# Over the planted limits (400 characters, 60 tokens) without repeating a unit of 1-4 characters back to back (a
# symbol loop is flagged as repetitive too, and these rows plant one reason each).
LONG = "".join(str(i % 10) for i in range(401))
MANY_TOKENS = ".,;:!?" * 12
REPEAT = "the cat sat " * 5
SCRIPT = '<script>alert("planted")</script>'

NOT_NULL = "expect_column_values_to_not_be_null"
LENGTHS = "expect_column_value_lengths_to_be_between"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
NOT_IN_SET = "expect_column_values_to_not_be_in_set"
A_GT_B = "expect_column_pair_values_a_to_be_greater_than_b"
MEAN = "expect_column_mean_to_be_between"


# --------------------------------------------------------------------------- builders


def sample(row_id: str, **kw) -> dict:
    row = {
        "row_id": row_id,
        "prompt_id": f"p-{row_id}",
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
        "prompt_id": f"p-{row_id}",
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
        "prompt_id": f"p-{row_id}",
        "prompt": f"Prompt for {row_id}",
        "completion": "a fine completion",
        "score": 1.0,
        "ended": True,
    }
    row.update(kw)
    return row


def eval_row(row_id: str, **kw) -> dict:
    row = {
        "row_id": row_id,
        "prompt_id": f"e-{row_id}",
        "prompt": "An evaluation prompt.",
        "sample_index": 0,
        "response": "an answer",
        "n_tokens": 3,
        "finished": True,
        "score": 0.5,
        "passed": False,
    }
    row.update(kw)
    return row


BUILDERS = {"samples": sample, "pairs": pair, "sft": sft_row, "eval_candidate": eval_row}


def clean_tables() -> dict[str, pd.DataFrame]:
    return {
        "samples": pd.DataFrame([sample("s1"), sample("s2", sample_index=1, score=0.0, passed=False)]),
        "pairs": pd.DataFrame([pair("p1"), pair("p2")]),
        "sft": pd.DataFrame([sft_row("f1"), sft_row("f2")]),
    }


def gate(root: Path, tables, settings: QualityConfig = SETTINGS, **kw) -> QualityOutcome:
    kw.setdefault("build_data_docs", False)
    return run_quality_gate(root, tables, eval_prompts=EVAL_PROMPTS, settings=settings, **kw)


def reasons_by_row(outcome: QualityOutcome, table: str) -> dict[str, set[str]]:
    q = outcome.quarantine
    q = q[q["table"] == table]
    return {rid: set(reasons.split("; ")) for rid, reasons in zip(q["row_id"], q["reasons"])}


# --------------------------------------------------------------------------- planted bad rows

# (table, row_id, overrides, the exact reasons it is quarantined for; empty: it stays clean)
PLANTED: list[tuple[str, str, dict, set[str]]] = [
    ("samples", "s_short", {"response": "xy"}, {f"{LENGTHS}(response)"}),
    ("samples", "s_long", {"response": LONG}, {f"{LENGTHS}(response)"}),
    ("samples", "s_script", {"response": SCRIPT + LONG[:400]}, {f"{LENGTHS}(response)"}),
    ("samples", "s_no_tokens", {"response": "   "}, {f"{BETWEEN}(response_tokens)"}),
    ("samples", "s_many_tokens", {"response": MANY_TOKENS}, {f"{BETWEEN}(response_tokens)"}),
    ("samples", "s_score", {"score": 1.5}, {f"{BETWEEN}(score)"}),
    ("samples", "s_dup", {"prompt_id": "p-s_ok", "sample_index": 0}, {f"{IN_SET}(duplicate_sample)"}),
    ("samples", "s_refusal", {"response": REFUSAL}, {f"{IN_SET}(response_refusal)"}),
    ("samples", "s_repeat", {"response": REPEAT}, {f"{IN_SET}(response_repetitive)"}),
    ("samples", "s_language", {"response": RUSSIAN}, {f"{IN_SET}(response_wrong_language)"}),
    ("samples", "s_asked_russian", {"prompt_id": "p-ru", "response": RUSSIAN}, set()),
    ("samples", "s_short_foreign", {"response": "Это коротко."}, set()),
    ("samples", "s_truncated", {"finished": False}, set()),  # samples: counted in a share, not quarantined
    ("pairs", "p_same", {"chosen": "same text", "rejected": "same text"}, {f"{IN_SET}(chosen_equals_rejected)"}),
    ("pairs", "p_dup_prompt", {"prompt": " PROMPT for  p_ok", "chosen": "another good answer"},
     {f"{IN_SET}(duplicate_prompt)"}),
    ("pairs", "p_dup_pair", {"prompt": "Prompt for p_ok"},
     {f"{IN_SET}(duplicate_prompt)", f"{IN_SET}(duplicate_prompt_chosen_rejected)"}),
    ("pairs", "p_eval", {"prompt": "  what IS the\tcapital of   FRANCE? "},
     {f"{NOT_IN_SET}(prompt_normalized)", f"{IN_SET}(prompt_shares_eval_ngram)"}),
    ("pairs", "p_ngram", {"prompt": "Kindly describe the water cycle in detail for a class of adults."},
     {f"{IN_SET}(prompt_shares_eval_ngram)"}),
    ("pairs", "p_cscore", {"chosen_score": 1.5}, {f"{BETWEEN}(chosen_score)"}),
    ("pairs", "p_rscore", {"rejected_score": -0.2}, {f"{BETWEEN}(rejected_score)"}),
    ("pairs", "p_long_chosen", {"chosen": LONG}, {f"{LENGTHS}(chosen)"}),
    ("pairs", "p_chosen_tokens", {"chosen": "   "}, {f"{BETWEEN}(chosen_tokens)"}),
    ("pairs", "p_order", {"chosen_score": 0.2, "rejected_score": 0.5}, {f"{A_GT_B}(chosen_score,rejected_score)"}),
    ("pairs", "p_short_rejected", {"rejected": "xy"}, {f"{LENGTHS}(rejected)"}),
    ("pairs", "p_rejected_tokens", {"rejected": MANY_TOKENS}, {f"{BETWEEN}(rejected_tokens)"}),
    ("pairs", "p_refusal", {"chosen": REFUSAL}, {f"{IN_SET}(chosen_refusal)"}),
    ("pairs", "p_rejected_refusal", {"rejected": REFUSAL}, set()),  # a rejected answer is meant to be bad
    ("pairs", "p_repeat", {"chosen": REPEAT}, {f"{IN_SET}(chosen_repetitive)"}),
    ("pairs", "p_language", {"chosen": RUSSIAN}, {f"{IN_SET}(chosen_wrong_language)"}),
    ("pairs", "p_truncated", {"prompt_id": "p-cut", "chosen": "cut off in the midd"}, {f"{IN_SET}(chosen_truncated)"}),
    ("sft", "f_eval", {"prompt": "Eval Prompt\nTwo"}, {f"{NOT_IN_SET}(prompt_normalized)"}),  # too short for n-grams
    ("sft", "f_ngram", {"prompt": "Please describe the water cycle in detail for a class of chemists."},
     {f"{IN_SET}(prompt_shares_eval_ngram)"}),
    ("sft", "f_dup", {"prompt": "prompt for F_OK"}, {f"{IN_SET}(duplicate_prompt_completion)"}),
    ("sft", "f_long", {"completion": LONG}, {f"{LENGTHS}(completion)"}),
    ("sft", "f_tokens", {"completion": MANY_TOKENS}, {f"{BETWEEN}(completion_tokens)"}),
    ("sft", "f_score", {"score": -1.0}, {f"{BETWEEN}(score)"}),
    ("sft", "f_refusal", {"completion": REFUSAL}, {f"{IN_SET}(completion_refusal)"}),
    ("sft", "f_repeat", {"completion": REPEAT}, {f"{IN_SET}(completion_repetitive)"}),
    ("sft", "f_language", {"completion": RUSSIAN}, {f"{IN_SET}(completion_wrong_language)"}),
    ("sft", "f_truncated", {"prompt_id": "p-cut", "completion": "cut off in the midd"},
     {f"{IN_SET}(completion_truncated)"}),
    # Cut off (not ended) under a prompt with an exact count or an upper limit (the gate's limited_prompts).
    ("sft", "f_cut_limit", {"prompt_id": "p-limit", "ended": False}, {f"{IN_SET}(cut_off_under_limit)"}),
    ("sft", "f_ended_limit", {"prompt_id": "p-limit", "ended": True}, set()),
    ("sft", "f_cut_no_limit", {"ended": False}, set()),  # open targets of other prompts stay (training opens them)
    ("eval_candidate", "e_score", {"score": 2.0}, {f"{BETWEEN}(score)"}),
    ("eval_candidate", "e_dup", {"prompt_id": "e-e_ok"}, {f"{IN_SET}(duplicate_prompt_id)"}),
    ("eval_candidate", "e_tokens", {"n_tokens": -1}, {f"{BETWEEN}(n_tokens)"}),
    ("eval_candidate", "e_empty", {"response": ""}, set()),  # an empty answer is a legitimate (bad) answer
]
PREFIX = {"samples": "s", "pairs": "p", "sft": "f", "eval_candidate": "e"}
# A null in every required column (row_id aside: a table without row ids is refused before GX runs).
PLANTED += [
    (table, f"{PREFIX[table]}_null_{column}", {column: None}, {f"{NOT_NULL}({column})"})
    for table in BUILDERS
    for column in REQUIRED_COLUMNS[KINDS[table]]
    if column != "row_id"
]
# Rows whose content the planted rows refer to: a truncated sample, a clean row of every table.
SUPPORT = {
    "samples": [sample("s_ok"), sample("s_cut", prompt_id="p-cut", response="cut off in the midd", finished=False)],
    "pairs": [pair("p_ok")],
    "sft": [sft_row("f_ok")],
    "eval_candidate": [eval_row("e_ok")],
}


def planted_tables() -> dict[str, pd.DataFrame]:
    rows = {table: list(rows) for table, rows in SUPPORT.items()}
    for table, row_id, overrides, _ in PLANTED:
        rows[table].append(BUILDERS[table](row_id, **overrides))
    return {table: pd.DataFrame(r) for table, r in rows.items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[QualityOutcome, dict[str, pd.DataFrame], Path]:
    tables = planted_tables()
    base = tmp_path_factory.mktemp("planted")
    root = base / "great_expectations"
    out = gate(root, tables, expected_languages={"p-ru": "ru"}, limited_prompts={"p-limit"}, run_name="round-0007",
               docs_dir=base / "round-0007" / "data_docs", build_data_docs=True)
    return out, tables, root


@pytest.mark.parametrize(("table", "row_id", "overrides", "reasons"), PLANTED,
                         ids=[f"{t}-{r}" for t, r, _, _ in PLANTED])
def test_planted_row_lands_in_quarantine_with_its_expectation(planted, table, row_id, overrides, reasons) -> None:
    out, tables, _ = planted
    found = reasons_by_row(out, table)
    if reasons:
        assert found.get(row_id) == reasons
        assert row_id not in set(out.clean[table]["row_id"])
        (row_json,) = out.quarantine.loc[out.quarantine["row_id"] == row_id, "row_json"]
        original = json.loads(row_json)
        assert original == json.loads(json.dumps(BUILDERS[table](row_id, **overrides)))  # the row, unchanged
    else:
        assert row_id not in found
        assert row_id in set(out.clean[table]["row_id"])


def test_every_row_level_expectation_fails_on_a_planted_row(planted) -> None:
    out, _, _ = planted
    blamed = {(t, reason) for t, _, _, reasons in PLANTED for reason in reasons}
    missing: list[str] = []
    for report in out.report.tables:
        for o in report.expectations:
            if o.expectation == MEAN or (o.expectation == NOT_NULL and o.column == "row_id"):
                continue
            label = f"{o.expectation}({o.column})"
            missing.extend([] if (report.table, label) in blamed else [f"{report.table}: {label}"])
            assert o.success is False or (report.table, label) not in blamed, f"{report.table}: {label} did not fail"
    assert not missing, f"no planted row for {missing}"


def test_clean_rows_continue(planted) -> None:
    out, tables, _ = planted
    for table, df in tables.items():
        bad = {r for t, r, _, reasons in PLANTED if t == table and reasons}
        expected = df[~df["row_id"].isin(bad)].reset_index(drop=True)
        pd.testing.assert_frame_equal(out.clean[table], expected)
        assert list(out.clean[table].columns) == list(df.columns)  # derived columns dropped
    assert out.report.passed  # every bound open
    assert out.report.failed_rows == len(out.quarantine) == sum(1 for *_, reasons in PLANTED if reasons)
    assert list(out.quarantine.columns) == list(QUARANTINE_COLUMNS)
    assert not any(c in row for row in out.quarantine["row_json"].map(json.loads)
                   for c in DERIVED_COLUMNS["pairs"])


def test_gx_results_are_stored_in_the_context(planted) -> None:
    import great_expectations as gx
    from great_expectations.data_context.types.resource_identifiers import ValidationResultIdentifier

    out, _, root = planted
    ids = out.report.validation_result_ids
    assert len(ids) == 4 and all("round-0007" in i for i in ids)
    for result_id in ids:
        assert (root / "uncommitted" / "validations" / f"{result_id}.json").is_file()
    ctx = gx.get_context(mode="file", context_root_dir=str(root))
    pairs_id = next(i for i in ids if i.startswith("flywheel_pairs/"))
    stored = ctx.validation_results_store.get(ValidationResultIdentifier.from_tuple(tuple(pairs_id.split("/"))))
    failed = {item["row_id"] for r in stored.results if not r.success
              for item in r.result.get("unexpected_index_list") or []}
    assert failed == set(reasons_by_row(out, "pairs"))
    for kind in ("samples", "pairs", "sft", "evaluation"):
        assert (root / "expectations" / f"flywheel_{kind}.json").is_file()


# --------------------------------------------------------------------------- Data Docs

REMOTE_ASSET = re.compile(r"<(?:script|link|img|iframe|source|embed)\b[^>]*(?:https?:)?//[^>]*>", re.I | re.S)


def docs_pages(out: QualityOutcome) -> dict[Path, str]:
    folder = Path(out.report.data_docs_path).parent
    return {p: p.read_text(encoding="utf-8") for p in folder.rglob("*.html")}


def test_data_docs_are_built_into_the_given_folder_with_every_suite(planted) -> None:
    out, _, _ = planted
    index = Path(out.report.data_docs_path)
    assert index.name == "index.html" and index.parent.name == "data_docs" and index.parent.parent.name == "round-0007"
    text = index.read_text(encoding="utf-8")
    for suite in ("flywheel_samples", "flywheel_pairs", "flywheel_sft", "flywheel_evaluation"):
        assert suite in text
        assert (index.parent / "expectations" / f"{suite}.html").is_file()
    links = re.findall(r'href="([^"#]+)"', text)
    assert len(links) >= 8 and all((index.parent / link).is_file() for link in links if "://" not in link)
    pages = docs_pages(out)
    assert any("response_wrong_language" in t for p, t in pages.items() if "validations" in p.parts)


def test_data_docs_load_nothing_from_the_network(planted) -> None:
    out, _, _ = planted
    pages = docs_pages(out)
    assert len(pages) >= 9
    for path, text in pages.items():
        assert not REMOTE_ASSET.search(text), (path, REMOTE_ASSET.search(text).group(0))
        assert "flywheel_offline.css" in text
    for sheet in Path(out.report.data_docs_path).parent.rglob("*.css"):
        assert not re.search(r"url\(\s*[\"']?(?:https?:)?//|@import", sheet.read_text()), sheet


def test_make_offline_strips_remote_assets_and_keeps_links(tmp_path: Path) -> None:
    page = tmp_path / "sub" / "page.html"
    page.parent.mkdir()
    page.write_text('<html><head><link rel="stylesheet" href="https://cdn.example/b.css">'
                    '<script src="//cdn.example/j.js"></script></head><body><img src="http://x/logo.png">'
                    '<a href="https://docs.example/">docs</a></body></html>')
    (tmp_path / "s.css").write_text("a { background: url('https://x/y.png') 0 0; }\n@import url(https://x/z.css);")
    make_offline(tmp_path)
    text = page.read_text()
    assert not REMOTE_ASSET.search(text)
    assert '<a href="https://docs.example/">docs</a>' in text
    assert '<link rel="stylesheet" href="../static/styles/flywheel_offline.css">' in text
    assert "https" not in (tmp_path / "s.css").read_text()


def test_planted_markup_is_escaped_in_data_docs(planted) -> None:
    out, _, _ = planted
    pages = docs_pages(out)
    assert not any(SCRIPT in text for text in pages.values())
    assert any('&lt;script&gt;alert(&#34;planted&#34;)' in t or "&lt;script&gt;alert(&quot;planted&quot;)" in t
               or "&lt;script&gt;alert(\"planted\")" in t for t in pages.values())


# --------------------------------------------------------------------------- shares stop the round

SHARE_CASES = [
    ("max_refusal_share", {"response": REFUSAL}, "refusals", "response_refusal"),
    ("max_repetition_share", {"response": REPEAT}, "degenerate repetitions", "response_repetitive"),
    ("max_truncated_share", {"finished": False}, "responses truncated at the token limit", "response_truncated"),
]


@pytest.mark.parametrize(("field", "bad", "what", "column"), SHARE_CASES, ids=[c[0] for c in SHARE_CASES])
def test_share_over_its_maximum_stops_the_round(tmp_path: Path, field, bad, what, column) -> None:
    rows = [sample(f"ok{i}") for i in range(7)] + [sample(f"bad{i}", **bad) for i in range(3)]
    tables = {"samples": pd.DataFrame(rows)}
    root = tmp_path / "great_expectations"

    within = gate(root, tables, SETTINGS.model_copy(update={field: 0.3}))
    assert within.report.passed and not within.report.share_failures
    assert share_observations(within.report)[f"samples.{column}"] == pytest.approx(0.3)

    over = gate(root, tables, SETTINGS.model_copy(update={field: 0.25}))
    assert not over.report.passed
    (failure,) = over.report.share_failures
    assert failure.parameter == field and failure.share == pytest.approx(0.3)
    with pytest.raises(QualityGateError) as info:
        enforce(over.report)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"samples: share of {what} 30.0% exceeds quality.{field} 25.0% ({MEAN}({column}))" in msg
    assert info.value.report is over.report
    # The flagged rows are still quarantined (refusal, repetition) or kept (truncated samples): nothing deleted.
    assert len(over.clean["samples"]) + len(over.quarantine) == 10


def test_default_limits_let_an_ordinary_round_through(tmp_path: Path) -> None:
    """Defaults: about 60% truncated answers (the default model at 96 tokens) and a few bad rows do not stop it."""
    rows = [sample(f"s{i}", response=f"An ordinary answer number {i}.", finished=i % 5 < 2) for i in range(40)]
    rows[0]["response"] = REFUSAL
    rows[1]["response"] = "the cat sat " * 8
    out = gate(tmp_path / "great_expectations", {"samples": pd.DataFrame(rows)}, QualityConfig())
    assert out.report.passed, out.report
    assert set(out.quarantine["row_id"]) == {"s0", "s1"}
    assert share_observations(out.report)["samples.response_truncated"] == pytest.approx(0.6)


# --------------------------------------------------------------------------- clean / empty / bound


def test_clean_tables_pass(tmp_path: Path) -> None:
    root = tmp_path / "great_expectations"
    tables = clean_tables()
    out = gate(root, tables, SETTINGS.model_copy(update={"max_failed_fraction": 0.0}))
    assert out.report.passed
    assert out.report.total_rows == 6 and out.report.failed_rows == 0
    assert all(t.success and t.failed_rows == 0 for t in out.report.tables)
    assert out.quarantine.empty and list(out.quarantine.columns) == list(QUARANTINE_COLUMNS)
    for name, df in tables.items():
        pd.testing.assert_frame_equal(out.clean[name], df)
    enforce(out.report)  # does not raise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["great_expectations"]  # GX wrote only under the root
    assert out.report.data_docs_path is None


@pytest.mark.parametrize(("quarantine", "ended_column", "kept"), [
    (True, True, {"ended", "missing"}),
    (False, True, {"ended", "missing", "cut"}),  # switched off: the cut-off row trains as an open target
    (True, False, {"ended", "missing", "cut"}),  # a table without `ended`: every row ended
])
def test_cut_off_rows_under_a_limit(tmp_path: Path, quarantine: bool, ended_column: bool, kept: set[str]) -> None:
    rows = [sft_row("ended", prompt_id="p-limit", ended=True), sft_row("cut", prompt_id="p-limit", ended=False),
            sft_row("missing", prompt_id="p-limit", ended=None)]
    frame = pd.DataFrame(rows) if ended_column else pd.DataFrame(rows).drop(columns=["ended"])
    out = gate(tmp_path / "great_expectations", {"sft": frame},
               SETTINGS.model_copy(update={"quarantine_cut_off_limits": quarantine}), limited_prompts=["p-limit"])
    assert set(out.clean["sft"]["row_id"]) == kept
    assert set(out.quarantine["row_id"]) == {"ended", "missing", "cut"} - kept
    assert list(out.clean["sft"].columns) == list(frame.columns)  # the derived column is not written


def test_empty_tables_pass(tmp_path: Path) -> None:
    tables = {
        "samples": pd.DataFrame(),  # no columns at all
        "pairs": pd.DataFrame(columns=list(pair("x"))),
        "sft": pd.DataFrame([sft_row("f1")]).iloc[0:0],
    }
    out = gate(tmp_path / "great_expectations", tables, SETTINGS.model_copy(update={"max_failed_fraction": 0.0}))
    assert out.report.passed, (out.report.errors, out.report.share_failures)
    assert out.report.total_rows == 0 and out.report.failed_fraction == 0.0
    assert out.quarantine.empty
    assert all(df.empty for df in out.clean.values())
    assert list(out.clean["pairs"].columns) == list(pair("x"))
    assert len(out.report.validation_result_ids) == 3


def test_gate_bound_and_enforce(tmp_path: Path) -> None:
    root = tmp_path / "great_expectations"
    rows = [sample(f"s{i}") for i in range(9)] + [sample("bad", score=3.0)]
    tables = {"samples": pd.DataFrame(rows)}

    ok = gate(root, tables, SETTINGS.model_copy(update={"max_failed_fraction": 0.2}))
    assert ok.report.passed and ok.report.failed_fraction == pytest.approx(0.1)
    enforce(ok.report)
    assert len(ok.clean["samples"]) == 9 and list(ok.quarantine["row_id"]) == ["bad"]

    over = gate(root, tables, SETTINGS.model_copy(update={"max_failed_fraction": 0.05}))
    assert not over.report.passed
    with pytest.raises(QualityGateError) as info:
        enforce(over.report)
    msg = str(info.value)
    assert "1 of 10 rows failed" in msg and "10.00%" in msg and "5.00%" in msg
    assert f"samples: {BETWEEN}(score) x1" in msg


def test_expectation_that_cannot_run_fails_the_gate(tmp_path: Path) -> None:
    tables = {"samples": pd.DataFrame([sample("a", score="high"), sample("b")])}
    out = gate(tmp_path / "great_expectations", tables)
    assert out.report.failed_fraction == 0.0  # no row could be blamed ...
    assert not out.report.passed  # ... but an unchecked column is not a pass
    assert out.report.errors and f"{BETWEEN}(score)" in out.report.errors[0]
    with pytest.raises(QualityGateError, match="could not be evaluated"):
        enforce(out.report)


def test_running_twice_on_the_same_root(tmp_path: Path) -> None:
    root = tmp_path / "great_expectations"
    first = gate(root, clean_tables(), run_name="round-1")
    versioned = {p: p.read_bytes() for p in root.rglob("*.json") if "uncommitted" not in p.parts}
    versioned[root / "great_expectations.yml"] = (root / "great_expectations.yml").read_bytes()
    tables = clean_tables()
    tables["pairs"] = pd.DataFrame([pair("p1"), pair("p2", chosen="x")])  # too short
    second = gate(root, tables, run_name="round-2")

    assert first.report.passed and first.report.gx_run_id == "round-1"
    assert list(second.quarantine["row_id"]) == ["p2"]
    both = first.report.validation_result_ids + second.report.validation_result_ids
    assert len(set(both)) == 6
    for path, content in versioned.items():  # suites, checkpoints and config stay byte-identical
        assert path.read_bytes() == content, path


def test_committed_suites_match_the_code(tmp_path: Path) -> None:
    """The suites in the repository's great_expectations/ are what the gate writes (refresh them if this fails)."""
    root = tmp_path / "great_expectations"
    gate(root, {**clean_tables(), "eval_candidate": pd.DataFrame([eval_row("e1")])})
    committed = Path(__file__).resolve().parents[2] / "great_expectations" / "expectations"
    for kind in ("samples", "pairs", "sft", "evaluation"):
        ours = json.loads((root / "expectations" / f"flywheel_{kind}.json").read_text())
        theirs = json.loads((committed / f"flywheel_{kind}.json").read_text())
        strip = lambda suite: sorted(json.dumps({k: v for k, v in e.items() if k != "id"}, sort_keys=True)
                                     for e in suite["expectations"])
        assert strip(ours) == strip(theirs), kind


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("tables", "kw", "match"),
    [
        ({"pairs": pd.DataFrame([pair("a")]).drop(columns=["rejected"])}, {}, "lacks column"),
        ({"sft": pd.DataFrame([sft_row("a"), sft_row("a")])}, {}, "duplicate row_id"),
        ({"sft": pd.DataFrame([sft_row(None)])}, {}, "null row_id"),
        ({"other": pd.DataFrame()}, {}, "unknown tables"),
        ({"sft": pd.DataFrame([sft_row("a", prompt_normalized="x")])}, {}, "derived column"),
        ({}, {"run_name": "a/b"}, "run_name"),
    ],
)
def test_invalid_inputs_raise_before_touching_gx(tmp_path: Path, tables, kw, match) -> None:
    root = tmp_path / "great_expectations"
    with pytest.raises(ValueError, match=match):
        run_quality_gate(root, tables, eval_prompts=[], settings=QualityConfig(), **kw)
    assert not root.exists()


@pytest.mark.parametrize("bad", [{"min_chars": 10, "max_chars": 5}, {"min_tokens": 9, "max_tokens": 2},
                                 {"max_failed_fraction": 1.5}, {"language": "english"}, {"max_refusal_share": -0.1}])
def test_quality_config_rejects_impossible_bounds(bad) -> None:
    with pytest.raises(ValueError):
        QualityConfig(**bad)


def test_normalize_prompt() -> None:
    assert normalize_prompt("  What IS\tthe\n capital? ") == "what is the capital?"
    assert normalize_prompt(None) is None


def test_module_import_is_light() -> None:
    code = (
        "import sys, flywheel.quality, flywheel.textchecks; "
        "bad = [m for m in ('great_expectations', 'pandas', 'langid') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
