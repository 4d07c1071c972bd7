"""What a flywheel run shows on its Prefect page: a round's summary, results table and links."""

from __future__ import annotations

import re

from flywheel.operations import mlflow_version_url
from flywheel.stages import RoundRecord


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def publish_round(record: RoundRecord, registered_name: str, tracking_uri: str) -> None:
    """A round's results table and a summary with the champion and candidate versions and links."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from flywheel.cli import summary_rows

    rows = summary_rows(record)
    create_table_artifact([{"figure": k, "value": v} for k, v in rows.items()],
                          key=artifact_key("round-results", registered_name),
                          description=f"{record.name} of {registered_name}")
    if record.evaluation is not None:
        ev = record.evaluation
        kinds = sorted(set(ev.candidate.per_type) | set(ev.champion.per_type))
        create_table_artifact(
            [{"instruction type": k, "instructions": ev.champion.per_type_count.get(k),
              "champion": round(ev.champion.per_type.get(k, 0.0), 4),
              "candidate": round(ev.candidate.per_type.get(k, 0.0), 4),
              # flipped instructions, what the promotion policy's sign test reads
              "lost": ev.per_type_flips.get(k, [None, None])[0],
              "gained": ev.per_type_flips.get(k, [None, None])[1]} for k in kinds],
            key=artifact_key("round-per-type", registered_name),
            description=f"Held-out accuracy per instruction type, {record.name}")
    lines = [f"## {registered_name} {record.name}: {record.status}", "",
             f"- champion at start: v{record.parent_version}"]
    links = [("champion", record.parent_version)]
    if record.registration is not None:
        lines.append(f"- candidate: v{record.registration.version}")
        links.append(("candidate", record.registration.version))
    if record.promotion is not None:
        lines.append(f"- promotion: {'yes' if record.promotion.promoted else 'no'}: {record.promotion.reason}")
    for label, version in links:
        url = mlflow_version_url(tracking_uri, registered_name, version)
        if url:
            lines.append(f"- [{label} v{version} in MLflow]({url})")
    data_docs = record.quality.report.data_docs_path
    if data_docs:
        from pathlib import Path

        lines.append(f"- [Great Expectations Data Docs]({Path(data_docs).resolve().as_uri()})")
    create_markdown_artifact("\n".join(lines) + "\n", key=artifact_key("round-summary", registered_name),
                             description=f"{record.name} of {registered_name}")
    if record.evaluation is not None:
        publish_plot(record, registered_name, tracking_uri)


def publish_plot(record: RoundRecord, registered_name: str, tracking_uri: str) -> None:
    """Accuracy per instruction type and the loss curve: an image on the run page and a file on the MLflow run."""
    import tempfile
    from pathlib import Path

    from prefect.artifacts import create_image_artifact

    from flywheel import registry
    from flywheel.plots import data_url, round_plot

    assert record.evaluation is not None
    mlflow_client = registry.client(tracking_uri)
    loss = [(m.step, m.value) for m in mlflow_client.get_metric_history(record.run_id, "train.loss")]
    with tempfile.TemporaryDirectory(prefix="flywheel-plot-") as tmp:
        path = round_plot(record.evaluation.champion.per_type, record.evaluation.candidate.per_type, loss,
                          f"{registered_name} {record.name}: v{record.parent_version} -> candidate",
                          Path(tmp) / f"{record.name}.png")
        mlflow_client.log_artifact(record.run_id, str(path), artifact_path="plots")
        create_image_artifact(data_url(path), key=artifact_key("round-plot", registered_name),
                              description=f"{record.name}: held-out accuracy per instruction type, training loss")
