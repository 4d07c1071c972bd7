"""infra/: the Compose topology, the Kubernetes work-pool job template and manifests, Helm values, accelerate configs.

No Docker engine or cluster here: Compose is checked for its structure (pinned images, health checks, volumes,
every variable in .env.example), Kubernetes objects against the Kubernetes schemas (kubernetes-validate), and the
accelerate configs through accelerate's own launcher checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S_VERSION = "1.33.0"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_topology_pinned_and_healthchecked():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-buckets", "prefect-server", "mlflow", "prefect-worker"}
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        if name != "minio-buckets":  # a one-shot job; the others run for good and say when they are ready
            assert "test" in service["healthcheck"], f"{name}: no health check"
    import prefect

    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect.__version__}-python3.11"
    assert set(compose["volumes"]) == {"postgres-data", "minio-data", "flywheel-workspace"}
    # Start order follows health, not just container start.
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully"
    assert services["prefect-worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # The Prefect server and MLflow keep their state in Postgres; MLflow's artifacts and the DVC remote in MinIO.
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow_cmd and "--artifacts-destination s3://" in mlflow_cmd
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["FLYWHEEL_DVC_REMOTE"].startswith("s3://") and worker_env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("prefect-server", "mlflow", "minio"):
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"


def test_compose_variables_are_all_in_env_example():
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert used <= set(example), f"missing from .env.example: {sorted(used - set(example))}"
    assert (INFRA / "postgres-init.sql").is_file() and "CREATE DATABASE mlflow" in (INFRA / "postgres-init.sql").read_text()


def test_dockerfile_copies_what_exists():
    root = INFRA.parent
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), f"Dockerfile copies missing {source}"
    assert '".[server]"' in (INFRA / "Dockerfile").read_text()


def _rendered_job_configuration(overrides: dict | None = None) -> dict:
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    variables = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    variables.update(overrides or {})
    config = apply_values(template["job_configuration"], variables)
    # As the Kubernetes worker does before it submits the job (prefect-kubernetes): the command string becomes
    # the container's args list, and the env mapping a list of name/value pairs.
    import shlex

    container = config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    if isinstance(container["args"], str):
        container["args"] = shlex.split(container["args"])
    if isinstance(container["env"], dict):
        container["env"] = [{"name": k, "value": str(v)} for k, v in container["env"].items()]
    return config


def test_gpu_work_pool_template_renders_a_valid_kubernetes_job():
    import jsonschema
    import kubernetes_validate

    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    jsonschema.validate(defaults, schema)

    config = _rendered_job_configuration({"gpu_count": 4, "node_selector": {"cloud.google.com/gke-accelerator":
                                                                            "nvidia-h100-80gb"}})
    job = config["job_manifest"]
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["flywheel-model-store"]
    assert {"name": "model-store", "mountPath": "/flywheel/state"} in container["volumeMounts"]


def test_gpu_work_pool_template_rejects_a_broken_job():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    job = _rendered_job_configuration({"gpu_count": 1})["job_manifest"]
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limts"] = {}  # a typo must not pass
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_kubernetes_manifests_are_valid():
    import kubernetes_validate

    documents = [d for d in yaml.safe_load_all((INFRA / "k8s" / "flywheel.yaml").read_text()) if d]
    kinds = {d["kind"] for d in documents}
    assert kinds == {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"}
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # generation, training and evaluation pods share it
    template = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    assert claim["metadata"]["name"] == template["variables"]["properties"]["model_store_claim"]["default"]
    endpoints = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} <= set(endpoints)


def test_helm_values_pin_versions_and_point_at_each_other():
    import prefect

    helm = INFRA / "k8s" / "helm"
    server = yaml.safe_load((helm / "prefect-server.yaml").read_text())
    worker = yaml.safe_load((helm / "prefect-worker.yaml").read_text())
    mlflow = yaml.safe_load((helm / "mlflow.yaml").read_text())
    assert server["global"]["prefect"]["image"]["prefectTag"] == f"{prefect.__version__}-python3.11"
    assert worker["worker"]["image"]["prefectTag"] == f"{prefect.__version__}-python3.11-kubernetes"
    assert worker["worker"]["config"]["type"] == "kubernetes"
    assert worker["worker"]["apiConfig"] == "selfHostedServer"
    api_url = worker["worker"]["selfHostedServerApiConfig"]["apiUrl"]
    endpoints = next(d for d in yaml.safe_load_all((INFRA / "k8s" / "flywheel.yaml").read_text())
                     if d and d["kind"] == "ConfigMap")["data"]
    assert api_url == endpoints["PREFECT_API_URL"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", mlflow["image"]["tag"])
    assert mlflow["backendStore"]["postgres"]["enabled"] and mlflow["artifactRoot"]["s3"]["enabled"]
    assert mlflow["extraEnvVars"]["MLFLOW_S3_ENDPOINT_URL"] == endpoints["MLFLOW_S3_ENDPOINT_URL"]


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed-zero3", "DEEPSPEED")])
def test_accelerate_configs_pass_accelerate_launch_checks(name, kind, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = INFRA / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise here
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    if kind == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()  # what each training process builds from the launcher's env
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        assert args.use_deepspeed and args.zero_stage == 3 and args.zero3_save_16bit_model is True


def test_endpoints_come_from_the_recipe_or_the_environment(monkeypatch, tmp_path):
    from flywheel.config import parse_config
    from flywheel.workspace import Workspace

    monkeypatch.delenv("FLYWHEEL_DVC_REMOTE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = Workspace.from_config(parse_config({}), tmp_path)
    assert local.dvc_remote == str(tmp_path / ".flywheel" / "dvc-remote")
    assert local.tracking_uri == f"sqlite:///{tmp_path / '.flywheel' / 'mlflow.db'}"
    monkeypatch.setenv("FLYWHEEL_DVC_REMOTE", "s3://dvc/flywheel")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    served = Workspace.from_config(parse_config({}), tmp_path)
    assert (served.dvc_remote, served.tracking_uri) == ("s3://dvc/flywheel", "http://mlflow:5000")
    chosen = Workspace.from_config(parse_config({"storage": {"dvc_remote": "s3://mine/data",
                                                             "mlflow_tracking_uri": "http://tracking:80"}}), tmp_path)
    assert (chosen.dvc_remote, chosen.tracking_uri) == ("s3://mine/data", "http://tracking:80")  # the recipe wins
