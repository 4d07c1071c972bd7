"""Quality gate of a round, built on Great Expectations (GX) 1.x.

Every dataset a round writes is validated by a GX checkpoint against an expectation suite stored in a file
Data Context, so the suites (``<context_root>/expectations/flywheel_<kind>.json``) are versioned with the code:

- ``flywheel_samples``: generated samples; ``flywheel_pairs``: preference pairs; ``flywheel_sft``: SFT rows;
- ``flywheel_evaluation``: the held-out evaluation results of candidate and champion (tables ``eval_candidate``
  and ``eval_champion``).

Row-level checks (not-null, length bounds in characters and in tokens, score ranges, chosen above rejected,
chosen != rejected, duplicate samples / prompts / pairs, the language of the response, refusals, degenerate
repetition, truncated training targets, SFT targets cut off under an exact count or upper limit of their prompt,
evaluation prompts and their near-duplicates in training data) quarantine the failing rows with the failing
expectations' names; share-level checks (share of refusals, of degenerate repetition, of responses truncated at the
token limit) are table-level expectations whose failure stops the round (:func:`enforce`) naming the check and the
share. The gate also stops when more than ``max_failed_fraction`` of all rows fail. Nothing is deleted: quarantined
rows keep their original content (``row_json``).

Only built-in GX expectations are used (a suite that holds a custom expectation class silently loses it in a
process that has not imported the class). Checks no built-in expectation expresses directly are computed into
derived columns of a copy of each frame by the pure scorers of :mod:`flywheel.textchecks` (``<column>_tokens``,
``<column>_refusal``, ``<column>_repetitive``, ``<column>_wrong_language``, ``<column>_truncated``,
``duplicate_*``, ``prompt_normalized``, ``prompt_shares_eval_ngram``, ...) and validated there, so every check
shows in Data Docs; derived columns are dropped again from the clean output and from quarantined rows.

Validation results land in the context's results store (``<context_root>/uncommitted/``, git-ignored). Data Docs
of each run are built into their own folder (the round's state folder in a round) and made readable offline:
no page loads anything from the network (see :func:`make_offline`).

great_expectations and pandas are imported inside the functions so that importing this module (and starting
the CLI) stays fast.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, Field

from flywheel.config import QualityConfig

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "DERIVED_COLUMNS",
    "KINDS",
    "QUARANTINE_COLUMNS",
    "REQUIRED_COLUMNS",
    "ExpectationOutcome",
    "QualityGateError",
    "QualityOutcome",
    "QualityReport",
    "ShareFailure",
    "TableReport",
    "enforce",
    "make_offline",
    "normalize_prompt",
    "run_quality_gate",
    "share_observations",
    "suite_name",
]

# Table name -> kind of table (one suite per kind).
KINDS: dict[str, str] = {
    "samples": "samples",
    "pairs": "pairs",
    "sft": "sft",
    "eval_candidate": "evaluation",
    "eval_champion": "evaluation",
}

# Columns every table of a kind must carry (an empty table may lack them: it passes).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": (
        "row_id", "prompt_id", "prompt", "sample_index", "response", "n_tokens", "finished", "score", "passed",
    ),
    "pairs": ("row_id", "prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"),
    "sft": ("row_id", "prompt_id", "prompt", "completion", "score"),
    "evaluation": ("row_id", "prompt_id", "prompt", "response", "n_tokens", "finished", "score", "passed"),
}
# Text columns with length bounds (characters and tokens). An evaluation answer may be empty: no bounds there.
_LENGTH_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("response",),
    "pairs": ("chosen", "rejected"),
    "sft": ("completion",),
    "evaluation": (),
}
# Text columns checked for refusals, repetition and language: what the model produced or learns to produce
# (a pair's rejected answer is meant to be bad).
_CONTENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("response",),
    "pairs": ("chosen",),
    "sft": ("completion",),
    "evaluation": (),
}
_CONTENT_CHECKS = ("refusal", "repetitive", "wrong_language")
# Training targets whose truncation at the token limit quarantines the row (when quality.quarantine_truncated).
_TRUNCATION_COLUMNS: dict[str, tuple[str, ...]] = {"pairs": ("chosen",), "sft": ("completion",)}
# SFT rows the token limit cut off (``ended`` false) whose prompt sets an exact count or an upper limit
# (flywheel.verifiers.limits_length): quarantined when quality.quarantine_cut_off_limits.
_CUT_OFF_LIMIT = "cut_off_under_limit"
_SCORE_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("score",),
    "pairs": ("chosen_score", "rejected_score"),
    "sft": ("score",),
    "evaluation": ("score",),
}
# Derived "this row repeats an earlier one" columns and their keys (prompt keys are normalized prompts).
_DUPLICATE_KEYS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "samples": (("duplicate_sample", ("prompt_id", "sample_index")),),
    "pairs": (
        ("duplicate_prompt", ("prompt_normalized",)),
        ("duplicate_prompt_chosen_rejected", ("prompt_normalized", "chosen", "rejected")),
    ),
    "sft": (("duplicate_prompt_completion", ("prompt_normalized", "completion")),),
    "evaluation": (("duplicate_prompt_id", ("prompt_id",)),),
}
_EVAL_CHECKED = ("pairs", "sft")  # training data: no evaluation prompt, no near-duplicate of one


@dataclass(frozen=True)
class _Share:
    column: str  # derived boolean column whose mean is the share
    parameter: str  # QualityConfig field holding the maximum
    what: str


# Table-level expectations: the share of flagged rows must stay within a configured maximum.
_SHARES: dict[str, tuple[_Share, ...]] = {
    "samples": (
        _Share("response_refusal", "max_refusal_share", "refusals"),
        _Share("response_repetitive", "max_repetition_share", "degenerate repetitions"),
        _Share("response_truncated", "max_truncated_share", "responses truncated at the token limit"),
    ),
}
_SHARE_EXPECTATION = "expect_column_mean_to_be_between"


def _derived(kind: str) -> tuple[str, ...]:
    cols: list[str] = []
    for c in _LENGTH_COLUMNS[kind]:
        cols.append(f"{c}_tokens")
    for c in _CONTENT_COLUMNS[kind]:
        cols += [f"{c}_{check}" for check in _CONTENT_CHECKS]
    for c in _TRUNCATION_COLUMNS.get(kind, ()):
        cols.append(f"{c}_truncated")
    cols += [s.column for s in _SHARES.get(kind, ()) if s.column not in cols]
    if kind == "pairs":
        cols.append("chosen_equals_rejected")
    if kind == "sft":
        cols.append(_CUT_OFF_LIMIT)
    if kind in ("pairs", "sft"):
        cols.append("prompt_normalized")
    cols += [name for name, _ in _DUPLICATE_KEYS.get(kind, ())]
    if kind in _EVAL_CHECKED:
        cols.append("prompt_shares_eval_ngram")
    return tuple(dict.fromkeys(cols))


# Columns added to the validated copy of each table; an input may not carry them.
DERIVED_COLUMNS: dict[str, tuple[str, ...]] = {kind: _derived(kind) for kind in REQUIRED_COLUMNS}
QUARANTINE_COLUMNS: tuple[str, ...] = ("table", "row_id", "reasons", "row_json")

_DATASOURCE = "flywheel"
_BATCH_DEFINITION = "whole_table"
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WS_RE = re.compile(r"\s+")

# Suite parameters ({"$PARAMETER": name}) filled in at run time from QualityConfig and the round.
_P_EVAL = "eval_prompts_normalized"
_P_TRUNCATED_OK = "allowed_truncated_values"
_P_CUT_OFF_LIMIT_OK = "allowed_cut_off_under_limit_values"
_CONFIG_PARAMETERS = (
    "min_chars", "max_chars", "min_tokens", "max_tokens",
    "max_refusal_share", "max_repetition_share", "max_truncated_share",
)


def suite_name(kind: str) -> str:
    """Name of the GX expectation suite of a kind of table."""
    return f"flywheel_{kind}"


def checkpoint_name(table: str) -> str:
    """Name of the GX checkpoint (and validation definition) of a table."""
    return f"flywheel_{table}"


def normalize_prompt(text: Any) -> Any:
    """Lowercase and collapse whitespace; non-strings (None, NaN) pass through."""
    if not isinstance(text, str):
        return text
    return _WS_RE.sub(" ", text.lower()).strip()


# --------------------------------------------------------------------------- models


class ExpectationOutcome(BaseModel):
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    observed_value: float | None = None  # table-level expectations (shares)
    error: str | None = None  # set when GX raised while evaluating it


class ShareFailure(BaseModel):
    """A table-level check over its configured maximum: the round stops."""

    table: str
    check: str  # the expectation, as "expectation(column)"
    what: str
    share: float
    maximum: float
    parameter: str  # the QualityConfig field

    def message(self) -> str:
        return (f"{self.table}: share of {self.what} {self.share:.1%} exceeds quality.{self.parameter} "
                f"{self.maximum:.1%} ({self.check})")


class TableReport(BaseModel):
    table: str
    suite: str = ""
    rows: int
    failed_rows: int
    success: bool
    expectations: list[ExpectationOutcome]
    validation_result_id: str | None = None


class QualityReport(BaseModel):
    tables: list[TableReport]
    total_rows: int
    failed_rows: int
    failed_fraction: float
    max_failed_fraction: float
    passed: bool
    gx_run_id: str  # the GX run_name shared by every table's validation result
    validation_result_ids: list[str] = Field(default_factory=list)
    data_docs_path: str | None = None
    context_root: str | None = None
    errors: list[str] = Field(default_factory=list)  # expectations GX could not evaluate
    share_failures: list[ShareFailure] = Field(default_factory=list)

    def top_reasons(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` failed row-level expectations with the most unexpected rows."""
        counts = [
            (f"{t.table}: {_reason(o.expectation, o.column)}", o.unexpected_count)
            for t in self.tables
            for o in t.expectations
            if not o.success and o.unexpected_count > 0
        ]
        counts.sort(key=lambda kv: (-kv[1], kv[0]))
        return counts[:n]


@dataclass(frozen=True)
class QualityOutcome:
    report: QualityReport
    clean: dict[str, pd.DataFrame]
    # columns: table, row_id, reasons ("; "-joined), row_json (original row as JSON)
    quarantine: pd.DataFrame


class QualityGateError(RuntimeError):
    """Raised by :func:`enforce` when a round's data fails the quality gate."""

    def __init__(self, message: str, report: QualityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def share_observations(report: QualityReport) -> dict[str, float]:
    """The observed shares of the table-level checks, as ``{"<table>.<column>": share}``."""
    return {
        f"{t.table}.{o.column}": o.observed_value
        for t in report.tables
        for o in t.expectations
        if o.expectation == _SHARE_EXPECTATION and o.observed_value is not None
    }


def enforce(report: QualityReport) -> None:
    """Raise :class:`QualityGateError` (one line naming every failed bound) when ``report`` did not pass."""
    if report.passed:
        return
    parts: list[str] = []
    if report.share_failures:
        parts.append("; ".join(f.message() for f in report.share_failures))
    if report.failed_fraction > report.max_failed_fraction:
        part = (f"{report.failed_rows} of {report.total_rows} rows failed ({report.failed_fraction:.2%}); "
                f"the bound is {report.max_failed_fraction:.2%}")
        top = report.top_reasons()
        if top:
            part += "; top reasons: " + ", ".join(f"{r} x{c}" for r, c in top)
        parts.append(part)
    if report.errors:
        parts.append("expectations that could not be evaluated: " + "; ".join(report.errors))
    msg = "quality gate failed: " + "; ".join(parts) + f" (GX run {report.gx_run_id}"
    if report.data_docs_path:
        msg += f", Data Docs {report.data_docs_path}"
    raise QualityGateError(msg + ")", report)


# --------------------------------------------------------------------------- GX setup


def _expectations(kind: str) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    exps: list[Any] = [E.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS[kind]]
    for c in _LENGTH_COLUMNS[kind]:
        exps.append(E.ExpectColumnValueLengthsToBeBetween(
            column=c, min_value={"$PARAMETER": "min_chars"}, max_value={"$PARAMETER": "max_chars"}))
        exps.append(E.ExpectColumnValuesToBeBetween(
            column=f"{c}_tokens", min_value={"$PARAMETER": "min_tokens"}, max_value={"$PARAMETER": "max_tokens"}))
    exps += [E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in _SCORE_COLUMNS[kind]]
    if kind == "evaluation":
        exps.append(E.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=0))
    if kind == "pairs":
        exps.append(E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="chosen_score", column_B="rejected_score", or_equal=False,
            ignore_row_if="either_value_is_missing"))  # a missing score is the not-null check's failure
        exps.append(E.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False]))
    for name, _ in _DUPLICATE_KEYS.get(kind, ()):
        exps.append(E.ExpectColumnValuesToBeInSet(column=name, value_set=[False]))
    for c in _CONTENT_COLUMNS[kind]:
        exps += [E.ExpectColumnValuesToBeInSet(column=f"{c}_{check}", value_set=[False])
                 for check in _CONTENT_CHECKS]
    for c in _TRUNCATION_COLUMNS.get(kind, ()):
        exps.append(E.ExpectColumnValuesToBeInSet(
            column=f"{c}_truncated", value_set={"$PARAMETER": _P_TRUNCATED_OK}))
    if kind == "sft":
        exps.append(E.ExpectColumnValuesToBeInSet(column=_CUT_OFF_LIMIT, value_set={"$PARAMETER": _P_CUT_OFF_LIMIT_OK}))
    if kind in _EVAL_CHECKED:
        exps.append(E.ExpectColumnValuesToNotBeInSet(column="prompt_normalized", value_set={"$PARAMETER": _P_EVAL}))
        exps.append(E.ExpectColumnValuesToBeInSet(column="prompt_shares_eval_ngram", value_set=[False]))
    for share in _SHARES.get(kind, ()):
        exps.append(E.ExpectColumnMeanToBeBetween(
            column=share.column, min_value=0, max_value={"$PARAMETER": share.parameter}))
    return exps


def _open_context(context_root: Path) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", context_root_dir=str(context_root))
    # Persist "no progress bars, no analytics" once; later opens read it back.
    changed = False
    pb = ctx.variables.progress_bars

    def _on(key: str) -> bool:
        if pb is None:
            return True
        return bool(pb.get(key, True) if isinstance(pb, dict) else getattr(pb, key, True))

    if _on("globally") or _on("metric_calculations"):
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        changed = True
    if ctx.variables.analytics_enabled is not False:
        ctx.variables.analytics_enabled = False
        changed = True
    if changed:
        ctx.variables.save()
    return ctx


def _config_key(expectation: Any) -> str:
    """An expectation's configuration without its id, as a comparable string."""
    d = expectation.dict(exclude={"id", "rendered_content"})
    for attr in ("notes", "meta"):  # falsy values are equivalent (as in GX's own __eq__)
        d[attr] = d.get(attr) or None
    return json.dumps(d, sort_keys=True, default=str)


def _suite(ctx: Any, kind: str) -> Any:
    """The kind's suite, added or updated in the store with stable expectation ids."""
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

    name = suite_name(kind)
    # GX 1.24 gotcha: Expectation.__eq__ includes the id, so suites.add_or_update never recognises an unchanged
    # expectation and re-ids every one on each call (a diff in the versioned suite file every round). Carry the
    # stored ids over ourselves.
    try:
        stored = ctx.suites.get(name)
    except DataContextError:  # not stored yet
        stored = None
    suite = gx.ExpectationSuite(name=name, expectations=_expectations(kind))
    if stored is not None:  # (ids may only be set once the suite holds the expectations)
        by_config = {_config_key(e): e.id for e in stored.expectations}
        for e in suite.expectations:
            e.id = by_config.get(_config_key(e))
    return suite


def _checkpoint(ctx: Any, table: str, suite: Any) -> Any:
    """Get-or-create the datasource/asset/batch definition; add-or-update the checkpoint (and its suite)."""
    import great_expectations as gx

    try:
        ds = ctx.data_sources.get(_DATASOURCE)
    except LookupError:
        ds = ctx.data_sources.add_pandas(_DATASOURCE)
    try:
        asset = ds.get_asset(table)
    except LookupError:
        asset = ds.add_dataframe_asset(table)
    try:
        bd = asset.get_batch_definition(_BATCH_DEFINITION)
    except LookupError:
        bd = asset.add_batch_definition_whole_dataframe(_BATCH_DEFINITION)

    name = checkpoint_name(table)
    checkpoint = gx.Checkpoint(
        name=name,
        validation_definitions=[gx.ValidationDefinition(name=name, data=bd, suite=suite)],
        actions=[],  # Data Docs are built per run into their own folder (_build_docs)
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row_id"]},
    )
    # Updates the validation definition and the suite too (stable ids when unchanged).
    return ctx.checkpoints.add_or_update(checkpoint)


# --------------------------------------------------------------------------- frames


def _check_inputs(tables: Mapping[str, pd.DataFrame]) -> None:
    unknown = sorted(set(tables) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown tables {unknown}; expected some of {sorted(KINDS)}")
    for table, df in tables.items():
        kind = KINDS[table]
        clash = sorted(set(DERIVED_COLUMNS[kind]) & set(df.columns))
        if clash:
            raise ValueError(f"table {table!r} already has derived column(s) {clash}")
        if len(df) == 0:
            continue
        missing = [c for c in REQUIRED_COLUMNS[kind] if c not in df.columns]
        if missing:
            raise ValueError(f"table {table!r} lacks column(s) {missing}")
        ids = df["row_id"]
        if ids.isna().any():
            raise ValueError(f"table {table!r} has null row_id values")
        if ids.duplicated().any():
            dup = ids[ids.duplicated()].astype(str).unique().tolist()[:5]
            raise ValueError(f"table {table!r} has duplicate row_id values, e.g. {dup}")


@dataclass(frozen=True)
class _RoundFacts:
    """What the derived columns need besides the row itself."""

    settings: QualityConfig
    eval_index: Any  # textchecks.NgramIndex of the evaluation prompts
    languages: Mapping[str, str]  # prompt_id -> expected language, where the prompt asks for one
    unfinished: frozenset[tuple[Any, Any]]  # (prompt_id, response) of samples truncated at the token limit
    limited: frozenset[Any]  # prompt_ids with an exact count or an upper limit among their instructions


def text_limits(settings: QualityConfig) -> Any:
    """The text checks' parameters (``flywheel.textchecks.TextLimits``) from the recipe's quality section: what the
    row checks use, and what evaluation counts repetition with."""
    from flywheel.textchecks import TextLimits

    return TextLimits(
        language=settings.language,
        language_min_letters=settings.language_min_letters,
        repetition_ngram=settings.repetition_ngram,
        repetition_max_repeats=settings.repetition_max_repeats,
        decontamination_ngram=settings.decontamination_ngram,
    )


def _flag_column(work: pd.DataFrame, column: str, check: str, facts: _RoundFacts) -> list[bool]:
    from flywheel.textchecks import CHECKS

    base = text_limits(facts.settings)
    scorer = CHECKS[check]
    if check != "wrong_language" or not facts.languages:
        return [bool(scorer(t, base)) for t in work[column]]
    per_language: dict[str | None, Any] = {}
    flags = []
    for pid, text in zip(work["prompt_id"], work[column]):
        expected = facts.languages.get(pid, base.language)
        limits = per_language.get(expected)
        if limits is None:
            limits = per_language[expected] = base.model_copy(update={"language": expected})
        flags.append(bool(scorer(text, limits)))
    return flags


def _derive(table: str, df: pd.DataFrame, facts: _RoundFacts) -> pd.DataFrame:
    """Copy of ``df`` with every required column present plus the derived columns."""
    from flywheel.textchecks import count_tokens, shares_ngram

    kind = KINDS[table]
    work = df.copy()
    for c in REQUIRED_COLUMNS[kind]:  # only reachable for empty frames (checked before)
        if c not in work.columns:
            work[c] = None
    work = work.reset_index(drop=True)
    for c in _LENGTH_COLUMNS[kind]:
        work[f"{c}_tokens"] = work[c].map(count_tokens).astype("Int64")
    for c in _CONTENT_COLUMNS[kind]:
        for check in _CONTENT_CHECKS:
            work[f"{c}_{check}"] = _bool_series(_flag_column(work, c, check, facts))
    if kind == "samples":
        work["response_truncated"] = (~work["finished"].fillna(True).astype(bool)).astype(bool)
    for c in _TRUNCATION_COLUMNS.get(kind, ()):
        work[f"{c}_truncated"] = _bool_series(
            [(pid, text) in facts.unfinished for pid, text in zip(work["prompt_id"], work[c])])
    if kind == "sft":
        # A table written without ``ended`` (older rounds, user tables): its rows ended, as training reads them.
        ended = work["ended"].astype("boolean").fillna(True) if "ended" in work.columns else [True] * len(work)
        work[_CUT_OFF_LIMIT] = _bool_series(
            [not bool(done) and pid in facts.limited for pid, done in zip(work["prompt_id"], ended)])
    if kind == "pairs":
        work["chosen_equals_rejected"] = _bool_series(
            list(work["chosen"].notna() & (work["chosen"] == work["rejected"])))
    if kind in ("pairs", "sft"):
        work["prompt_normalized"] = work["prompt"].map(normalize_prompt).astype(object)
    for name, keys in _DUPLICATE_KEYS.get(kind, ()):
        work[name] = _bool_series(list(work.duplicated(subset=list(keys), keep="first")))
    if kind in _EVAL_CHECKED:
        work["prompt_shares_eval_ngram"] = _bool_series([shares_ngram(p, facts.eval_index) for p in work["prompt"]])
    return work


def _bool_series(values: list[bool]) -> Any:
    import pandas as pd

    return pd.Series(values, dtype=bool)


# --------------------------------------------------------------------------- gate


def run_quality_gate(
    context_root: Path,
    tables: Mapping[str, pd.DataFrame],
    *,
    eval_prompts: Iterable[str],
    settings: QualityConfig,
    expected_languages: Mapping[str, str] | None = None,
    limited_prompts: Iterable[Any] = (),
    run_name: str | None = None,
    docs_dir: Path | None = None,
    build_data_docs: bool = True,
) -> QualityOutcome:
    """Validate ``tables`` with GX, quarantine failing rows, and decide the gate.

    ``tables`` maps some of :data:`KINDS` ("samples", "pairs", "sft", "eval_candidate", "eval_champion") to
    DataFrames with a unique ``row_id`` column. ``settings``: the recipe's quality section (bounds, limits).
    ``expected_languages``: prompt_id -> language for prompts that ask for a language (other prompts expect
    ``settings.language``). ``limited_prompts``: prompt_ids whose instructions set an exact count or an upper
    limit (:func:`flywheel.verifiers.limits_length`); their SFT rows that were cut off (``ended`` false) are
    quarantined when ``settings.quarantine_cut_off_limits``. ``run_name`` (letters, digits, ``._-``) tags the GX
    validation results; by default one is generated. Data Docs of this run go to ``docs_dir`` (default
    ``<context_root>/uncommitted/data_docs/runs/<run_name>``). Does not raise when the gate fails: call
    :func:`enforce` on ``outcome.report`` for that.
    """
    import pandas as pd

    from flywheel.textchecks import NgramIndex

    context_root = Path(context_root)
    _check_inputs(tables)
    now = _dt.datetime.now(_dt.timezone.utc)
    if run_name is None:
        run_name = f"quality-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    elif not _RUN_NAME_RE.match(run_name):
        raise ValueError(f"run_name must match {_RUN_NAME_RE.pattern}, got {run_name!r}")

    eval_prompts = [p for p in eval_prompts if isinstance(p, str)]
    eval_set = sorted({normalize_prompt(p) for p in eval_prompts})
    params: dict[str, Any] = {name: getattr(settings, name) for name in _CONFIG_PARAMETERS}
    params[_P_EVAL] = eval_set
    params[_P_TRUNCATED_OK] = [False] if settings.quarantine_truncated else [False, True]
    params[_P_CUT_OFF_LIMIT_OK] = [False] if settings.quarantine_cut_off_limits else [False, True]
    samples = tables.get("samples")
    unfinished: frozenset[tuple[Any, Any]] = frozenset()
    if samples is not None and len(samples):
        cut = samples[~samples["finished"].fillna(True).astype(bool)]
        unfinished = frozenset(zip(cut["prompt_id"], cut["response"]))
    facts = _RoundFacts(
        settings=settings,
        eval_index=NgramIndex.build(eval_prompts, settings.decontamination_ngram),
        languages=dict(expected_languages or {}),
        unfinished=unfinished,
        limited=frozenset(limited_prompts),
    )

    # GX >= 1.x reads this before a context exists; the context config also says so.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    context_root.mkdir(parents=True, exist_ok=True)
    ctx = _open_context(context_root)
    run_id = gx.RunIdentifier(run_name=run_name, run_time=now)

    table_reports: list[TableReport] = []
    result_keys: list[Any] = []
    errors: list[str] = []
    shares: list[ShareFailure] = []
    clean: dict[str, pd.DataFrame] = {}
    quarantine_parts: list[pd.DataFrame] = []
    suites: dict[str, Any] = {}

    for table, df in tables.items():
        kind = KINDS[table]
        work = _derive(table, df, facts)
        if kind not in suites:
            suites[kind] = _suite(ctx, kind)
        checkpoint = _checkpoint(ctx, table, suites[kind])
        result = checkpoint.run(
            batch_parameters={"dataframe": work}, expectation_parameters=params, run_id=run_id
        )
        ((vr_key, vr),) = result.run_results.items()
        result_keys.append(vr_key)

        reasons: dict[Any, list[str]] = {}
        outcomes: list[ExpectationOutcome] = []
        for r in vr.results:
            cfg = r.expectation_config
            column = _column_label(cfg.kwargs)
            label = _reason(cfg.type, column)
            res = r.result or {}
            error = _exception_message(r.exception_info)
            if error is not None:
                errors.append(f"{table}: {label}: {error}")
            observed = res.get("observed_value")
            outcome = ExpectationOutcome(
                expectation=cfg.type,
                column=column,
                success=bool(r.success),
                unexpected_count=int(res.get("unexpected_count") or 0),
                observed_value=float(observed) if isinstance(observed, (int, float)) else None,
                error=error,
            )
            outcomes.append(outcome)
            if r.success or error is not None:
                continue
            if cfg.type == _SHARE_EXPECTATION:
                share = next(s for s in _SHARES[kind] if s.column == column)
                if outcome.observed_value is None and len(work) == 0:
                    continue  # the share of an empty table is undefined, not exceeded
                shares.append(ShareFailure(
                    table=table, check=label, what=share.what, share=outcome.observed_value or 0.0,
                    maximum=float(getattr(settings, share.parameter)), parameter=share.parameter,
                ))
                continue
            index_list = res.get("unexpected_index_list") or []
            if not index_list or len(index_list) != outcome.unexpected_count:
                # Never let a failure pass unattributed: without row ids the gate fails.
                errors.append(
                    f"{table}: {label}: failed with {outcome.unexpected_count} unexpected "
                    f"values but {len(index_list)} row ids"
                )
            for item in index_list:
                rid = _index_key(item["row_id"] if isinstance(item, dict) else item)
                bucket = reasons.setdefault(rid, [])
                if label not in bucket:
                    bucket.append(label)

        original_cols = list(df.columns)
        if reasons:
            bad = work["row_id"].map(_index_key).isin(list(reasons))
            qrows = work.loc[bad, original_cols]
            quarantine_parts.append(
                pd.DataFrame(
                    {
                        "table": table,
                        "row_id": qrows["row_id"].tolist(),
                        "reasons": ["; ".join(reasons[_index_key(rid)]) for rid in qrows["row_id"]],
                        "row_json": [_row_json(rec) for rec in qrows.to_dict(orient="records")],
                    }
                )
            )
            clean[table] = work.loc[~bad, original_cols].reset_index(drop=True)
            failed = int(bad.sum())
        else:
            clean[table] = df.loc[:, original_cols].reset_index(drop=True)
            failed = 0

        table_reports.append(
            TableReport(
                table=table,
                suite=suite_name(kind),
                rows=len(df),
                failed_rows=failed,
                success=bool(vr.success),
                expectations=outcomes,
                validation_result_id="/".join(str(part) for part in vr_key.to_tuple()),
            )
        )

    total = sum(t.rows for t in table_reports)
    failed_total = sum(t.failed_rows for t in table_reports)
    fraction = failed_total / total if total else 0.0
    docs_index = None
    if build_data_docs and tables:
        target = Path(docs_dir) if docs_dir is not None else context_root / "uncommitted" / "data_docs" / "runs" / run_name
        docs_index = str(_build_docs(ctx, target, suites, result_keys, table_reports, run_name))
    report = QualityReport(
        tables=table_reports,
        total_rows=total,
        failed_rows=failed_total,
        failed_fraction=fraction,
        max_failed_fraction=settings.max_failed_fraction,
        passed=fraction <= settings.max_failed_fraction and not errors and not shares,
        gx_run_id=run_name,
        validation_result_ids=[t.validation_result_id for t in table_reports if t.validation_result_id],
        data_docs_path=docs_index,
        context_root=str(context_root),
        errors=errors,
        share_failures=shares,
    )
    if quarantine_parts:
        quarantine = pd.concat(quarantine_parts, ignore_index=True)
    else:
        quarantine = pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_COLUMNS})
    return QualityOutcome(report=report, clean=clean, quarantine=quarantine)


def _column_label(kwargs: Mapping[str, Any]) -> str | None:
    if kwargs.get("column") is not None:
        return str(kwargs["column"])
    if kwargs.get("column_list"):
        return ",".join(kwargs["column_list"])
    if kwargs.get("column_A") is not None:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    return None


# --------------------------------------------------------------------------- Data Docs

_DOCS_MANIFEST = "flywheel_runs.json"
_OFFLINE_CSS = "static/styles/flywheel_offline.css"
# Tags that load something (as opposed to <a> links, which a reader may follow or not).
_REMOTE_SCRIPT_RE = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>\s*</script\s*>", re.I | re.S)
_REMOTE_TAG_RE = re.compile(
    r"<(?:link|img|iframe|source|embed)\b[^>]*\b(?:src|href|srcset)\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I | re.S
)
_REMOTE_CSS_URL_RE = re.compile(r"url\(\s*[\"']?(?:https?:)?//[^)]*\)", re.I)
_CSS_IMPORT_RE = re.compile(r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//[^;]*;", re.I)

# Bootstrap's layout and Font Awesome's status icons, in the few rules the GX pages need to read well offline.
OFFLINE_CSS = """/* flywheel: local stand-in for the CDN stylesheets GX Data Docs use (bootstrap, font-awesome). */
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212529; margin: 0;
       line-height: 1.45; }
.container-fluid, .container { padding: 0 1rem; }
.row { display: flex; flex-wrap: wrap; }
.col-12, .col-sm-12, .col-xs-12 { flex: 0 0 100%; max-width: 100%; }
.col-md-2, .col-lg-2 { flex: 0 0 18%; max-width: 18%; }
.col-md-10, .col-lg-10 { flex: 0 0 80%; max-width: 80%; }
.col-6 { flex: 0 0 50%; max-width: 50%; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
th, td { border: 1px solid #dee2e6; padding: .25rem .5rem; vertical-align: top; text-align: left;
         overflow-wrap: anywhere; }
.card { border: 1px solid #dee2e6; border-radius: .25rem; margin: .5rem 0; padding: .5rem; }
.show-scrollbars { overflow: auto; max-height: 24rem; }
pre, code { white-space: pre-wrap; word-break: break-word; }
.nav { list-style: none; padding-left: 0; }
.text-success { color: #198754; } .text-danger { color: #dc3545; } .text-warning { color: #9a6700; }
.badge { display: inline-block; padding: .1em .4em; border-radius: .25rem; background: #e9ecef; }
.fas, .far, .fa { font-style: normal; }
.fa-check-circle::before { content: "\\2714"; } .fa-times::before, .fa-times-circle::before { content: "\\2718"; }
.fa-exclamation-triangle::before { content: "\\26A0"; } .fa-question-circle::before { content: "?"; }
.ge-failed { color: #dc3545; } .ge-passed { color: #198754; }
"""


def make_offline(folder: Path) -> None:
    """Make a built Data Docs folder readable with no network: drop every tag that loads a remote asset
    (scripts, stylesheets, images: CDN copies of bootstrap, jquery, font-awesome, vega, the GX logo), drop
    remote ``url(...)``/``@import`` from the copied stylesheets, and link a local stand-in stylesheet instead.
    Links (``<a href>``) stay: following one is the reader's choice. The pages' content is static HTML."""
    folder = Path(folder)
    css = folder / _OFFLINE_CSS
    css.parent.mkdir(parents=True, exist_ok=True)
    css.write_text(OFFLINE_CSS, encoding="utf-8")
    for sheet in folder.rglob("*.css"):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        cleaned = _REMOTE_CSS_URL_RE.sub("none", _CSS_IMPORT_RE.sub("", text))
        if cleaned != text:
            sheet.write_text(cleaned, encoding="utf-8")
    for page in folder.rglob("*.html"):
        text = page.read_text(encoding="utf-8", errors="replace")
        cleaned = _REMOTE_TAG_RE.sub("", _REMOTE_SCRIPT_RE.sub("", text))
        href = os.path.relpath(css, page.parent).replace(os.sep, "/")
        tag = f'<link rel="stylesheet" href="{html.escape(href)}">'
        if tag not in cleaned:
            cleaned = re.sub(r"</head\s*>", lambda m: tag + "\n" + m.group(0), cleaned, count=1, flags=re.I)
        if cleaned != text:
            page.write_text(cleaned, encoding="utf-8")


def _build_docs(ctx: Any, target: Path, suites: Mapping[str, Any], result_keys: list[Any],
                reports: list[TableReport], run_name: str) -> Path:
    """Render this run's suites and validation results into ``target`` (only these, not the whole store),
    list them in ``target/index.html`` (with earlier runs built into the same folder), and make it offline."""
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier
    from great_expectations.render.renderer.site_builder import SiteBuilder

    target.mkdir(parents=True, exist_ok=True)
    builder = SiteBuilder(
        data_context=ctx,
        store_backend={"class_name": "TupleFilesystemStoreBackend", "base_directory": str(target.resolve())},
        site_name="flywheel_run",
        show_how_to_buttons=False,
        runtime_environment={"root_directory": ctx.root_directory},
    )
    # GX renders unexpected values (prompts, responses) into the pages unescaped: a response holding markup
    # would run in the reader's browser. Pages are rendered from escaped copies; the stored results keep the data.
    validations = builder.site_section_builders.get("validations")
    if validations is not None:
        validations.source_store = _EscapingStore(validations.source_store)
    ids = [ExpectationSuiteIdentifier(name=s.name) for s in suites.values()] + list(result_keys)
    builder.build(resource_identifiers=ids, build_index=False)

    manifest_path = target / _DOCS_MANIFEST
    entries: list[dict[str, Any]] = []
    if manifest_path.is_file():
        entries = json.loads(manifest_path.read_text(encoding="utf-8"))
    for key, report in zip(result_keys, reports):
        url = builder.get_resource_url(resource_identifier=key, only_if_exists=False) or ""
        page = Path(unquote(urlparse(url).path)) if url.startswith("file:") else None
        entries.append({
            "run_name": run_name,
            "run_time": str(key.run_id.run_time),
            "table": report.table,
            "suite": report.suite,
            "success": report.success,
            "rows": report.rows,
            "failed_rows": report.failed_rows,
            "failed_checks": sorted({_reason(o.expectation, o.column) for o in report.expectations if not o.success}),
            "page": os.path.relpath(page, target).replace(os.sep, "/") if page else None,
        })
    manifest_path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    index = target / "index.html"
    index.write_text(_index_html(entries, sorted(p.stem for p in (target / "expectations").glob("*.html"))),
                     encoding="utf-8")
    make_offline(target)
    _prune_static(target)
    return index


class _EscapingStore:
    """A read-only view of a GX validation results store whose results come with every string HTML-escaped."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def list_keys(self) -> Any:
        return self._store.list_keys()

    def get(self, key: Any) -> Any:
        import copy

        result = copy.deepcopy(self._store.get(key))
        for r in result.results:
            if r.result:
                r.result = _escape_strings(r.result)
            cfg = r.expectation_config
            if cfg is not None:
                cfg.kwargs = _escape_strings(dict(cfg.kwargs))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _escape_strings(value: Any) -> Any:
    if isinstance(value, str):
        return html.escape(value, quote=False)
    if isinstance(value, dict):
        return {k: _escape_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_escape_strings(v) for v in value)
    return value


def _prune_static(folder: Path) -> None:
    """Drop the GX static files no page or stylesheet refers to (its images and fonts: 4 MB a run otherwise)."""
    static = folder / "static"
    texts = "\n".join(p.read_text(encoding="utf-8", errors="replace")
                      for p in [*folder.rglob("*.html"), *folder.rglob("*.css")])
    for path in sorted(static.rglob("*")):
        if path.is_file() and path.suffix != ".css" and path.relative_to(static).as_posix() not in texts:
            path.unlink()
    for path in sorted(static.rglob("*"), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _index_html(entries: list[dict[str, Any]], suites: list[str]) -> str:
    e = html.escape
    rows = []
    for item in entries:
        status = '<span class="ge-passed">passed</span>' if item["success"] else '<span class="ge-failed">failed</span>'
        page = f'<a href="{e(item["page"])}">{e(item["table"])}</a>' if item.get("page") else e(item["table"])
        rows.append(
            f"<tr><td>{e(item['run_name'])}</td><td>{e(item['run_time'])}</td><td>{page}</td>"
            f"<td><a href=\"expectations/{e(item['suite'])}.html\">{e(item['suite'])}</a></td><td>{status}</td>"
            f"<td>{int(item['rows'])}</td><td>{int(item['failed_rows'])}</td>"
            f"<td>{e(', '.join(item.get('failed_checks') or []))}</td></tr>"
        )
    suite_items = "".join(f'<li><a href="expectations/{e(s)}.html">{e(s)}</a></li>' for s in suites)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>flywheel Data Docs</title></head><body>"
        "<div class=\"container-fluid\"><h1>Data Docs</h1>"
        "<p>Great Expectations validation results of this round's datasets. Rows that failed a row-level "
        "expectation are in the round's <code>quarantine.parquet</code> with the expectations' names.</p>"
        "<h2>Validation results</h2><table><thead><tr><th>run</th><th>time</th><th>table</th><th>suite</th>"
        "<th>result</th><th>rows</th><th>failed rows</th><th>failed expectations</th></tr></thead><tbody>"
        + "".join(rows)
        + f"</tbody></table><h2>Expectation suites</h2><ul>{suite_items}</ul></div></body></html>\n"
    )


# --------------------------------------------------------------------------- helpers


def _reason(expectation: str, column: str | None) -> str:
    return f"{expectation}({column})" if column else expectation


def _jsonable(value: Any) -> Any:
    import numpy as np
    import pandas as pd

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (pd.Timestamp, _dt.datetime, _dt.date)):
        return value.isoformat()
    return value


def _row_json(row: Mapping[str, Any]) -> str:
    return json.dumps(
        {str(k): _jsonable(v) for k, v in row.items()}, ensure_ascii=False, default=str
    )


def _exception_message(info: Any) -> str | None:
    """The error of a GX expectation result, or None.

    GX 1.24 reports it in two shapes: flat ``{"raised_exception": bool,
    "exception_message": ...}``, or (when a metric failed to compute) a dict keyed by
    metric configuration id whose values carry ``exception_message``.
    """
    if not isinstance(info, Mapping) or not info:
        return None
    if "raised_exception" in info:
        if not info.get("raised_exception"):
            return None
        return str(info.get("exception_message") or "exception")
    messages = sorted(
        {
            str(v.get("exception_message") or "exception")
            for v in info.values()
            if isinstance(v, Mapping)
        }
    )
    return "; ".join(messages) if messages else None


def _index_key(value: Any) -> Any:
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value
