import os
from pathlib import Path

import pytest

for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def lively_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with larger layer weights, so that its answers depend on the prompt (tests/support/tiny.py)."""
    from tiny import build_lively_model

    return build_lively_model(tiny_model_dir, tmp_path_factory.mktemp("models") / "lively")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run tiny models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): a tiny model
    gains nothing from intra-op threads, and on a busy 2-core machine they only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
