"""Lineage: from a registered model version back to the exact data, code and recipe it came from."""

from __future__ import annotations

import json
from pydantic import BaseModel, ConfigDict

from flywheel import registry
from flywheel.workspace import Workspace

# The recipe travels with the dataset it produced (written by stages.open_round), so the DVC-tracked round says how
# it was made.
CONFIG_SNAPSHOT = "config.json"


class Lineage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: str
    aliases: list[str]
    parent_version: str | None
    base_version: str | None  # the first version of its parent chain, the drift budget's reference
    round: int | None
    round_tag: str | None
    git_commit: str | None
    dataset_md5: str | None
    config_hash: str | None
    config: dict | None
    review: dict | None
    metrics: dict[str, float]
    model_sha256: str | None
    weights_pruned_at: str | None = None  # `flywheel prune --refused` deleted the registered weights
    restore_commands: list[str]


def trace(workspace: Workspace, name: str, ref: str) -> Lineage:
    info = registry.get_version(workspace.tracking_uri, name, ref)
    tags = info.tags
    t = registry.TAG
    round_number = int(tags[f"{t}round"]) if tags.get(f"{t}round", "0") != "0" else None
    round_tag = tags.get(f"{t}round_tag")
    config = review = None
    metrics: dict[str, float] = {}
    if info.run_id:
        run = registry.client(workspace.tracking_uri).get_run(info.run_id)
        metrics = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("eval.")}
    record_path = workspace.records / f"{round_tag}.json" if round_tag else None
    if record_path is not None and record_path.is_file():
        record = json.loads(record_path.read_text())
        review = record.get("review")
    data_dir = workspace.rounds_data / round_tag if round_tag else None
    if data_dir is not None and (data_dir / CONFIG_SNAPSHOT).is_file():
        config = json.loads((data_dir / CONFIG_SNAPSHOT).read_text())
    commands = []
    if round_tag:
        commands = [f"git checkout {round_tag} -- data.dvc && dvc pull",
                    f"flywheel checkout --round {round_number}"]
    return Lineage(
        name=name, version=info.version, aliases=info.aliases, parent_version=tags.get(f"{t}parent_version"),
        base_version=tags.get(f"{t}base_version"),
        round=round_number, round_tag=round_tag, git_commit=tags.get(f"{t}git_commit"),
        dataset_md5=tags.get(f"{t}dataset_md5"), config_hash=tags.get(f"{t}config_hash"), config=config,
        review=review, metrics=metrics, model_sha256=tags.get(f"{t}model_sha256"),
        weights_pruned_at=tags.get(registry.WEIGHTS_PRUNED_AT), restore_commands=commands,
    )


def render(lineage: Lineage) -> str:
    lines = [f"{lineage.name} v{lineage.version}" + (f"  [{', '.join(lineage.aliases)}]" if lineage.aliases else "")]
    fields = [
        ("parent version", lineage.parent_version), ("base version", lineage.base_version), ("round", lineage.round),
        ("git tag", lineage.round_tag),
        ("git commit", lineage.git_commit), ("dataset (DVC md5)", lineage.dataset_md5),
        ("config hash", lineage.config_hash), ("weights sha256", lineage.model_sha256),
    ]
    if lineage.weights_pruned_at:
        fields.append(("weights", f"deleted {lineage.weights_pruned_at} (flywheel prune --refused)"))
    lines += [f"  {label:18} {value if value is not None else '-'}" for label, value in fields]
    if lineage.review:
        r = lineage.review
        lines.append(f"  {'review':18} {'approved' if r['approved'] else 'rejected'} by {r['reviewer']} "
                     f"({r['mode']}, {r['decided_at']}){': ' + r['notes'] if r.get('notes') else ''}")
    if lineage.metrics:
        lines.append("  evaluation:")
        lines += [f"    {k:44} {v:.4f}" for k, v in lineage.metrics.items() if ".type." not in k]
    if lineage.config:
        lines.append("  config: " + json.dumps(lineage.config, sort_keys=True))
    if lineage.restore_commands:
        lines.append("  get this exact data back:")
        lines += [f"    {c}" for c in lineage.restore_commands]
    return "\n".join(lines)

