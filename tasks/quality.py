from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.quality import QualityReport, enforce, share_observations
from flywheel.text import escape_markdown
from flywheel.workspace import Workspace


@task(name="quality-gate")
def quality_gate(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
                 split: stages.PromptSplit, data: stages.RoundData) -> stages.QualityResult:
    result = stages.quality_gate(config, workspace, context, split, data)
    rows = [
        {"table": t.table, "suite": t.suite, "rows": t.rows, "failed_rows": t.failed_rows, "success": t.success}
        for t in result.report.tables
    ]
    create_table_artifact(rows, key=f"quality-{context.name}", description=f"Quality gate of {context.name}")
    shares = share_observations(result.report)
    stages.log_metrics(workspace, context.run_id, {
        "quality.failed_fraction": result.report.failed_fraction, "quality.quarantined": result.quarantined,
        **{f"quality.share.{name}": value for name, value in shares.items()},
    })
    create_markdown_artifact(summary_markdown(context.name, result.report, result.quarantine_path),
                             key=f"quality-summary-{context.name}", description=f"Quality checks of {context.name}")
    if result.report.data_docs_path:
        create_link_artifact(Path(result.report.data_docs_path).resolve().as_uri(), link_text="Great Expectations Data Docs",
                             key=f"data-docs-{context.name}",
                             description=f"Validation results of {context.name} (offline HTML; also in the "
                                         f"round's MLflow run under data_docs/)")
    stages.log_quality_artifacts(workspace, context, result)
    enforce(result.report)  # fails the run loudly, after the quarantine and report are on disk
    return result


def summary_markdown(round_name: str, report: QualityReport, quarantine_path: str) -> str:
    """The gate's verdict, shares and top failed expectations, with where to look further."""
    lines = [f"# Quality gate of {round_name}: {'passed' if report.passed else 'FAILED'}", "",
             f"{report.failed_rows} of {report.total_rows} rows quarantined ({report.failed_fraction:.1%}, "
             f"bound {report.max_failed_fraction:.1%}) to `{quarantine_path}`.", ""]
    shares = share_observations(report)
    if shares:
        lines += ["| share | value |", "| --- | --- |", *[f"| {k} | {v:.1%} |" for k, v in shares.items()], ""]
    for failure in report.share_failures:
        lines.append(f"- **stopped**: {failure.message()}")
    for reason, count in report.top_reasons(10):
        lines.append(f"- `{reason}`: {count} rows")
    for error in report.errors:
        lines.append(f"- **could not evaluate**: {escape_markdown(error)}")
    if report.data_docs_path:
        lines += ["", f"Data Docs: [{report.data_docs_path}]({Path(report.data_docs_path).resolve().as_uri()})"]
    return "\n".join(lines)
