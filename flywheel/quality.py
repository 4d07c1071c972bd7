"""Quality gate of a round, built on Great Expectations (GX) 1.x.

Every dataset a round writes ("samples", "pairs", "sft") is validated by a GX
checkpoint against an expectation suite stored in a file Data Context, so the
suites (``<context_root>/expectations/flywheel_<table>.json``) are versioned with
the code, while the validation results land in the context's validation results
store (``<context_root>/uncommitted/validations/...``; GX git-ignores
``uncommitted/``) where a later reader can find them by the ids in the report.

Rows that fail any expectation are quarantined together with the reasons (never
dropped silently); the gate passes when the share of failed rows over all tables
stays within ``max_failed_fraction``.

Only built-in GX expectations are used (a suite that holds a custom expectation
class silently loses it in a process that has not imported the class). Checks
that no built-in expectation expresses directly are done on derived columns of a
copy of each frame (``chosen_equals_rejected``, ``duplicate_*``,
``prompt_normalized``), which are dropped again from the clean output.

great_expectations and pandas are imported inside the functions so that
importing this module (and starting the CLI) stays fast.
"""

from __future__ import annotations

import datetime as _dt
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

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "DERIVED_COLUMNS",
    "QUARANTINE_COLUMNS",
    "REQUIRED_COLUMNS",
    "ExpectationOutcome",
    "QualityGateError",
    "QualityOutcome",
    "QualityReport",
    "TableReport",
    "enforce",
    "normalize_prompt",
    "run_quality_gate",
    "suite_name",
]

# Columns every table must carry (an empty table may lack them: it passes).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": (
        "row_id",
        "prompt_id",
        "prompt",
        "sample_index",
        "response",
        "n_tokens",
        "finished",
        "score",
        "passed",
    ),
    "pairs": (
        "row_id",
        "prompt_id",
        "prompt",
        "chosen",
        "rejected",
        "chosen_score",
        "rejected_score",
    ),
    "sft": ("row_id", "prompt_id", "prompt", "completion", "score"),
}
_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("response",),
    "pairs": ("chosen", "rejected"),
    "sft": ("completion",),
}
_SCORE_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": ("score",),
    "pairs": ("chosen_score", "rejected_score"),
    "sft": ("score",),
}
# Derived boolean "this row is a repeat of an earlier row" columns and their keys.
_DUPLICATE_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pairs": ("duplicate_prompt_chosen_rejected", ("prompt", "chosen", "rejected")),
    "sft": ("duplicate_prompt_completion", ("prompt", "completion")),
}
_EVAL_CHECKED = ("pairs", "sft")
# Columns added to the validated copy of each table; an input may not carry them.
DERIVED_COLUMNS: dict[str, tuple[str, ...]] = {
    "samples": (),
    "pairs": ("chosen_equals_rejected", "duplicate_prompt_chosen_rejected", "prompt_normalized"),
    "sft": ("duplicate_prompt_completion", "prompt_normalized"),
}
QUARANTINE_COLUMNS: tuple[str, ...] = ("table", "row_id", "reasons", "row_json")

_DATASOURCE = "flywheel"
_BATCH_DEFINITION = "whole_table"
_DOCS_SITE = "local_site"
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WS_RE = re.compile(r"\s+")

# Suite parameters ({"$PARAMETER": name}) filled in at run time.
_P_MIN_CHARS = "min_chars"
_P_MAX_CHARS = "max_chars"
_P_EVAL = "eval_prompts_normalized"


def suite_name(table: str) -> str:
    """Name of the GX expectation suite (and checkpoint) of ``table``."""
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
    error: str | None = None  # set when GX raised while evaluating it


class TableReport(BaseModel):
    table: str
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

    def top_reasons(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` failed expectations with the most unexpected rows."""
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


def enforce(report: QualityReport) -> None:
    """Raise :class:`QualityGateError` when ``report`` did not pass."""
    if report.passed:
        return
    msg = (
        f"quality gate failed: {report.failed_rows} of {report.total_rows} rows failed "
        f"({report.failed_fraction:.2%}); the bound is {report.max_failed_fraction:.2%}"
    )
    top = report.top_reasons()
    if top:
        msg += "; top reasons: " + ", ".join(f"{r} x{c}" for r, c in top)
    if report.errors:
        msg += "; expectations that could not be evaluated: " + "; ".join(report.errors)
    msg += f" (GX run {report.gx_run_id})"
    raise QualityGateError(msg, report)


# --------------------------------------------------------------------------- GX setup


def _expectations(table: str) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    exps: list[Any] = [E.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS[table]]
    exps += [
        E.ExpectColumnValueLengthsToBeBetween(
            column=c,
            min_value={"$PARAMETER": _P_MIN_CHARS},
            max_value={"$PARAMETER": _P_MAX_CHARS},
        )
        for c in _TEXT_COLUMNS[table]
    ]
    exps += [
        E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1)
        for c in _SCORE_COLUMNS[table]
    ]
    if table == "pairs":
        exps.append(E.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False]))
    if table in _DUPLICATE_KEYS:
        exps.append(
            E.ExpectColumnValuesToBeInSet(column=_DUPLICATE_KEYS[table][0], value_set=[False])
        )
    if table in _EVAL_CHECKED:
        exps.append(
            E.ExpectColumnValuesToNotBeInSet(
                column="prompt_normalized", value_set={"$PARAMETER": _P_EVAL}
            )
        )
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


def _checkpoint(ctx: Any, table: str, *, build_data_docs: bool) -> Any:
    """Get-or-create the datasource/asset/batch definition; add-or-update the rest."""
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

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

    name = suite_name(table)
    expectations = _expectations(table)
    # GX 1.24 gotcha: Expectation.__eq__ includes the id, so suites.add_or_update never
    # recognises an unchanged expectation and re-ids every one on each call (a diff in
    # the versioned suite file every round). Carry the stored ids over ourselves.
    try:
        stored = ctx.suites.get(name)
    except DataContextError:  # not stored yet
        stored = None
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    if stored is not None:  # (ids may only be set once the suite holds the expectations)
        by_config = {_config_key(e): e.id for e in stored.expectations}
        for e in suite.expectations:
            e.id = by_config.get(_config_key(e))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")] if build_data_docs else []
    checkpoint = gx.Checkpoint(
        name=name,
        validation_definitions=[gx.ValidationDefinition(name=name, data=bd, suite=suite)],
        actions=actions,
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["row_id"],
        },
    )
    # Updates the validation definition and the suite too (stable ids when unchanged).
    return ctx.checkpoints.add_or_update(checkpoint)


# --------------------------------------------------------------------------- frames


def _check_inputs(
    tables: Mapping[str, pd.DataFrame], min_chars: int, max_chars: int, max_failed_fraction: float
) -> None:
    unknown = sorted(set(tables) - set(REQUIRED_COLUMNS))
    if unknown:
        raise ValueError(f"unknown tables {unknown}; expected some of {sorted(REQUIRED_COLUMNS)}")
    if not (0 <= min_chars <= max_chars):
        raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    if not (0.0 <= max_failed_fraction <= 1.0):
        raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
    for table, df in tables.items():
        clash = sorted(set(DERIVED_COLUMNS[table]) & set(df.columns))
        if clash:
            raise ValueError(f"table {table!r} already has derived column(s) {clash}")
        if len(df) == 0:
            continue
        missing = [c for c in REQUIRED_COLUMNS[table] if c not in df.columns]
        if missing:
            raise ValueError(f"table {table!r} lacks column(s) {missing}")
        ids = df["row_id"]
        if ids.isna().any():
            raise ValueError(f"table {table!r} has null row_id values")
        if ids.duplicated().any():
            dup = ids[ids.duplicated()].astype(str).unique().tolist()[:5]
            raise ValueError(f"table {table!r} has duplicate row_id values, e.g. {dup}")


def _derive(table: str, df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` with every required column present plus the derived columns."""
    work = df.copy()
    for c in REQUIRED_COLUMNS[table]:  # only reachable for empty frames (checked before)
        if c not in work.columns:
            work[c] = None
    work = work.reset_index(drop=True)
    if table == "pairs":
        work["chosen_equals_rejected"] = (
            work["chosen"].notna() & (work["chosen"] == work["rejected"])
        ).astype(bool)
    if table in _DUPLICATE_KEYS:
        col, keys = _DUPLICATE_KEYS[table]
        work[col] = work.duplicated(subset=list(keys), keep="first").astype(bool)
    if table in _EVAL_CHECKED:
        work["prompt_normalized"] = work["prompt"].map(normalize_prompt).astype(object)
    return work


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


def _reason(expectation: str, column: str | None) -> str:
    return f"{expectation}({column})" if column else expectation


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


# --------------------------------------------------------------------------- gate


def run_quality_gate(
    context_root: Path,
    tables: Mapping[str, pd.DataFrame],
    *,
    eval_prompts: Iterable[str],
    min_chars: int,
    max_chars: int,
    max_failed_fraction: float,
    run_name: str | None = None,
    build_data_docs: bool = True,
) -> QualityOutcome:
    """Validate ``tables`` with GX, quarantine failing rows, and decide the gate.

    ``tables`` maps some of "samples", "pairs", "sft" to DataFrames with a unique
    ``row_id`` column. ``run_name`` (letters, digits, ``._-``) tags the GX
    validation results; by default one is generated. Does not raise when the gate
    fails: call :func:`enforce` on ``outcome.report`` for that.
    """
    import pandas as pd

    context_root = Path(context_root)
    _check_inputs(tables, min_chars, max_chars, max_failed_fraction)
    now = _dt.datetime.now(_dt.timezone.utc)
    if run_name is None:
        run_name = f"quality-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    elif not _RUN_NAME_RE.match(run_name):
        raise ValueError(f"run_name must match {_RUN_NAME_RE.pattern}, got {run_name!r}")

    eval_set = sorted(
        {n for n in (normalize_prompt(p) for p in eval_prompts) if isinstance(n, str)}
    )
    params = {_P_MIN_CHARS: int(min_chars), _P_MAX_CHARS: int(max_chars), _P_EVAL: eval_set}

    # GX >= 1.x reads this before a context exists; the context config also says so.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    context_root.mkdir(parents=True, exist_ok=True)
    ctx = _open_context(context_root)
    run_id = gx.RunIdentifier(run_name=run_name, run_time=now)

    table_reports: list[TableReport] = []
    result_ids: list[str] = []
    errors: list[str] = []
    clean: dict[str, pd.DataFrame] = {}
    quarantine_parts: list[pd.DataFrame] = []

    for table, df in tables.items():
        work = _derive(table, df)
        checkpoint = _checkpoint(ctx, table, build_data_docs=build_data_docs)
        result = checkpoint.run(
            batch_parameters={"dataframe": work}, expectation_parameters=params, run_id=run_id
        )
        ((vr_key, vr),) = result.run_results.items()
        vr_id = "/".join(str(part) for part in vr_key.to_tuple())
        result_ids.append(vr_id)

        reasons: dict[Any, list[str]] = {}
        outcomes: list[ExpectationOutcome] = []
        for r in vr.results:
            cfg = r.expectation_config
            kwargs = cfg.kwargs
            column = kwargs.get("column")
            if column is None and kwargs.get("column_list"):
                column = ",".join(kwargs["column_list"])
            res = r.result or {}
            error = _exception_message(r.exception_info)
            if error is not None:
                errors.append(f"{table}: {_reason(cfg.type, column)}: {error}")
            outcomes.append(
                ExpectationOutcome(
                    expectation=cfg.type,
                    column=column,
                    success=bool(r.success),
                    unexpected_count=int(res.get("unexpected_count") or 0),
                    error=error,
                )
            )
            if r.success:
                continue
            label = _reason(cfg.type, column)
            index_list = res.get("unexpected_index_list") or []
            if error is None and (not index_list or len(index_list) != outcomes[-1].unexpected_count):
                # Never let a failure pass unattributed: without row ids the gate fails.
                errors.append(
                    f"{table}: {label}: failed with {outcomes[-1].unexpected_count} unexpected "
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
                        "reasons": [
                            "; ".join(reasons[_index_key(rid)]) for rid in qrows["row_id"]
                        ],
                        "row_json": [
                            _row_json(rec) for rec in qrows.to_dict(orient="records")
                        ],
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
                rows=len(df),
                failed_rows=failed,
                success=bool(vr.success),
                expectations=outcomes,
                validation_result_id=vr_id,
            )
        )

    total = sum(t.rows for t in table_reports)
    failed_total = sum(t.failed_rows for t in table_reports)
    fraction = failed_total / total if total else 0.0
    report = QualityReport(
        tables=table_reports,
        total_rows=total,
        failed_rows=failed_total,
        failed_fraction=fraction,
        max_failed_fraction=max_failed_fraction,
        passed=fraction <= max_failed_fraction and not errors,
        gx_run_id=run_name,
        validation_result_ids=result_ids,
        data_docs_path=_data_docs_index(ctx) if build_data_docs and tables else None,
        context_root=str(context_root),
        errors=errors,
    )
    if quarantine_parts:
        quarantine = pd.concat(quarantine_parts, ignore_index=True)
    else:
        quarantine = pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_COLUMNS})
    return QualityOutcome(report=report, clean=clean, quarantine=quarantine)


def _data_docs_index(ctx: Any) -> str | None:
    try:
        urls = ctx.get_docs_sites_urls(site_name=_DOCS_SITE)
    except Exception:  # noqa: BLE001 - docs are a convenience, never a failure
        return None
    for entry in urls:
        url = entry.get("site_url")
        if url and url.startswith("file://"):
            path = Path(unquote(urlparse(url).path))
            if path.exists():
                return str(path)
    return None

