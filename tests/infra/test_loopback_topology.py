"""The Compose topology without Docker, on 127.0.0.1: PostgreSQL (Debian's package) holding Prefect's and MLflow's
databases, a Prefect server and an MLflow tracking server on it, and an S3-compatible object store (moto's server
mode) holding MLflow's artifacts (proxied by the tracking server) and the DVC remote. A tiny round runs through
them with `flywheel run`, every endpoint given by the recipe or the environment."""

from __future__ import annotations

import subprocess

import pytest
from cli import cli_env, flywheel_cmd
from helpers import tiny_recipe, write_recipe
from servers import mlflow_server, postgres, postgres_bin, prefect_server, s3_server

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL not installed (.ci/run installs it)")]

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def topology(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("topology")
    with postgres(("prefect", "mlflow")) as pg, s3_server(("mlflow", "dvc")) as s3, \
            prefect_server(root / "prefect-server", database_url=pg.replace("postgresql://", "postgresql+asyncpg://")
                           + "/prefect") as prefect_api, \
            mlflow_server(root / "mlflow", f"{pg}/mlflow", artifacts_destination="s3://mlflow/artifacts",
                          env_extra={**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}) as tracking:
        workspace = root / "ws"
        workspace.mkdir()
        recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
            tiny_model_dir, storage__mlflow_tracking_uri=tracking, storage__dvc_remote="s3://dvc/flywheel"))
        # The round's client knows the object store only for DVC; MLflow artifacts go through the tracking server.
        env = {**cli_env(workspace), **S3_ENV, "PREFECT_API_URL": prefect_api, "AWS_ENDPOINT_URL": s3}
        result = subprocess.run(flywheel_cmd("run", "--config", str(recipe), "--workspace", str(workspace)),
                                cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        yield {"pg": pg, "s3": s3, "prefect": prefect_api, "tracking": tracking, "workspace": workspace,
               "recipe": recipe, "env": env, "stdout": result.stdout}


def _query(url: str, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _objects(s3: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in S3_ENV.items()
                                                    if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.timeout(1200)  # starts PostgreSQL, moto, the Prefect and MLflow servers, then runs a round
def test_round_state_lands_in_postgres_through_both_servers(topology):
    from flywheel import registry

    champion = registry.get_version(topology["tracking"], "tiny-policy", "champion")
    assert champion.version == "2" and champion.tags["flywheel.round"] == "1"  # tiny_recipe promotes by policy
    # The registry and the runs live in MLflow's PostgreSQL database...
    versions = _query(f"{topology['pg']}/mlflow", "select version from model_versions where name = 'tiny-policy'")
    assert sorted(v for (v,) in versions) == [1, 2]
    # ...and the round's flow and task runs in Prefect's.
    rounds = _query(f"{topology['pg']}/prefect",
                    "select fr.state_type from flow_run fr join flow f on f.id = fr.flow_id where f.name = 'flywheel-round'")
    assert [state for (state,) in rounds] == ["COMPLETED"]
    tasks = {name.rsplit("-", 1)[0] for (name,) in _query(f"{topology['pg']}/prefect", "select name from task_run")}
    assert {"generate", "judge", "train", "evaluate", "register"} <= tasks


def test_model_artifacts_live_in_the_object_store(topology, tmp_path):
    from flywheel import registry

    info = registry.get_version(topology["tracking"], "tiny-policy", "2")
    assert info.source.startswith("mlflow-artifacts:"), info.source  # proxied: clients never see the bucket
    keys = _objects(topology["s3"], "mlflow")
    assert any(key.endswith("/model/model.safetensors") for key in keys), keys[:20]
    # A machine with only the tracking URL gets the weights back, checksum verified.
    import os

    saved = {k: os.environ.pop(k, None) for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")}
    try:
        folder = registry.materialize(topology["tracking"], info, tmp_path / "store")
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    assert (folder / "model.safetensors").is_file()


def test_dataset_versions_live_in_the_dvc_remote_on_the_object_store(topology):
    import shutil

    workspace = topology["workspace"]
    keys = _objects(topology["s3"], "dvc")
    assert any(key.startswith("flywheel/files/md5/") for key in keys) and len(keys) >= 8
    # Lose the local copy and cache; `flywheel checkout` brings the round's data back from the object store.
    shutil.rmtree(workspace / "data" / "rounds")
    shutil.rmtree(workspace / ".dvc" / "cache")
    result = subprocess.run(flywheel_cmd("checkout", "--round", "1", "--config", str(topology["recipe"]),
                                         "--workspace", str(workspace)),
                            cwd=workspace, env=topology["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workspace / "data" / "rounds" / "round-0001" / "pairs.parquet").is_file()


def test_prune_deletes_a_refused_candidates_weights_through_the_tracking_server(topology, tmp_path):
    """`flywheel prune --refused` deletes proxied artifacts (mlflow-artifacts:) in the object store; the version stays."""
    from flywheel import registry
    from flywheel.models import write_metadata

    tracking, workspace = topology["tracking"], topology["workspace"]
    folder = tmp_path / "refused"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"refused" * 100)
    sha = write_metadata(folder).sha256
    client = registry.client(tracking)
    run = client.create_run(registry.experiment_id(tracking, "prune-test", tmp_path))
    refused = registry.register_model_dir(
        tracking, "tiny-policy", folder, run.info.run_id, description="a refused candidate",
        tags={f"{registry.TAG}round": "7", f"{registry.TAG}round_tag": "round-0007",
              f"{registry.TAG}model_sha256": sha})
    assert any(run.info.run_id in key for key in _objects(topology["s3"], "mlflow"))
    record = workspace / ".flywheel" / "rounds" / "round-0007.json"
    record.write_text("{}")  # its round finished (pruning reads no more of a record than that it exists)
    try:
        result = subprocess.run(flywheel_cmd("prune", "--refused", "--config", str(topology["recipe"]),
                                             "--workspace", str(workspace)),
                                cwd=workspace, env=topology["env"], capture_output=True, text=True, timeout=300)
    finally:
        record.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(run.info.run_id in key for key in _objects(topology["s3"], "mlflow"))
    info = registry.get_version(tracking, "tiny-policy", refused.version)
    assert info.tags[registry.WEIGHTS_PRUNED_AT]
    assert any(key.endswith("/model/model.safetensors") for key in _objects(topology["s3"], "mlflow"))  # v1, v2
