import errno
import itertools
from pathlib import Path

import pytest

from flywheel import registry
from flywheel.models import METADATA_FILE, ModelError, model_sha256, read_metadata
from flywheel.registry import CANDIDATE, CHAMPION, TAG, RegistryError

_names = itertools.count()


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def uri(mlflow_root) -> str:
    # One database for the module (creating one runs MLflow's migrations); every test uses its own model name.
    return f"sqlite:///{mlflow_root}/mlflow.db"


@pytest.fixture(scope="module")
def experiment(uri, mlflow_root) -> str:
    experiment_id = registry.experiment_id(uri, "flywheel/tests", mlflow_root / "artifacts")
    assert registry.experiment_id(uri, "flywheel/tests", mlflow_root / "artifacts") == experiment_id
    return experiment_id


@pytest.fixture
def name() -> str:
    return f"policy-{next(_names)}"


def fake_model(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(content)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def register(uri, experiment, name, folder: Path, round_number: int, aliases=(), **extra_tags):
    client = registry.client(uri)
    run = client.create_run(experiment, run_name=f"round-{round_number}")
    tags = {f"{TAG}round": str(round_number), f"{TAG}model_sha256": model_sha256(folder), **extra_tags}
    info = registry.register_model_dir(uri, name, folder, run.info.run_id, tags=tags,
                                       description=f"round {round_number}", aliases=aliases)
    client.set_terminated(run.info.run_id)
    return info


@pytest.fixture
def three_versions(uri, experiment, name, tmp_path):
    versions = [
        register(uri, experiment, name, fake_model(tmp_path / f"m{i}", bytes([i]) * 32), i,
                 aliases=(CHAMPION,) if i == 0 else (CANDIDATE,))
        for i in range(3)
    ]
    return versions


def test_register_creates_versions_with_tags_and_aliases(uri, name, three_versions, tmp_path):
    v1, v2, v3 = three_versions
    assert [v.version for v in three_versions] == ["1", "2", "3"]
    assert v1.name == name and v1.aliases == [CHAMPION]
    assert v1.tags[f"{TAG}round"] == "0"
    assert v1.tags[f"{TAG}model_sha256"] == model_sha256(tmp_path / "m0")
    assert v2.description == "round 1"
    assert v1.run_id and v1.run_id != v2.run_id
    assert v1.source.endswith("/model")
    # The candidate alias moved to the newest version; the champion stayed.
    listed = registry.list_versions(uri, name)
    assert [v.version for v in listed] == ["1", "2", "3"]
    assert [v.aliases for v in listed] == [[CHAMPION], [], [CANDIDATE]]


def test_get_version_by_number_v_prefix_and_alias(uri, name, three_versions):
    assert registry.get_version(uri, name, "2").version == "2"
    assert registry.get_version(uri, name, "v2").version == "2"
    assert registry.get_version(uri, name, CHAMPION).version == "1"
    assert registry.get_version(uri, name, CANDIDATE).version == "3"
    assert registry.get_version(uri, name, "v2").tags[f"{TAG}round"] == "1"


@pytest.mark.parametrize("ref", ["9", "v9", "nonexistent-alias"])
def test_unknown_ref_raises(uri, name, three_versions, ref):
    with pytest.raises(RegistryError, match=f"{name!r} has no version or alias"):
        registry.get_version(uri, name, ref)
    assert registry.find_version(uri, name, ref) is None


def test_unknown_model_raises(uri, experiment):
    with pytest.raises(RegistryError):
        registry.get_version(uri, "never-registered", "1")
    assert registry.list_versions(uri, "never-registered") == []


def test_set_champion_records_promoted_over_and_moves_the_alias(uri, name, three_versions):
    promotion = registry.set_champion(uri, name, "3", reason="better", actor="tester")
    assert promotion.promoted is True
    assert (promotion.version, promotion.previous, promotion.reason) == ("3", "1", "better")
    champion = registry.get_version(uri, name, CHAMPION)
    assert champion.version == "3"
    assert champion.tags[f"{TAG}promoted_over"] == "1"
    assert champion.tags[f"{TAG}promoted_by"] == "tester"
    assert champion.tags[f"{TAG}promotion_reason"] == "better"
    assert champion.tags[f"{TAG}promoted_at"].startswith("20")
    assert CHAMPION not in registry.get_version(uri, name, "1").aliases


def test_set_champion_accepts_a_v_reference(uri, name, three_versions):
    assert registry.set_champion(uri, name, "v2", reason="r", actor="a").version == "2"
    assert registry.get_version(uri, name, CHAMPION).version == "2"


def test_set_champion_to_the_current_champion_is_a_no_op(uri, name, three_versions):
    before = registry.get_version(uri, name, "1")
    promotion = registry.set_champion(uri, name, "1", reason="again", actor="tester")
    assert promotion.promoted is False
    assert promotion.version == "1" and promotion.previous == "1"
    assert "already the champion" in promotion.reason
    assert registry.get_version(uri, name, "1").tags == before.tags  # no promotion tags written


def test_first_champion_has_nothing_to_promote_over(uri, experiment, name, tmp_path):
    register(uri, experiment, name, fake_model(tmp_path / "m", b"x" * 8), 0)
    promotion = registry.set_champion(uri, name, "1", reason="first", actor="a")
    assert promotion.promoted is True and promotion.previous is None
    assert f"{TAG}promoted_over" not in registry.get_version(uri, name, CHAMPION).tags


def test_rollback_returns_to_the_previous_champion(uri, name, three_versions):
    registry.set_champion(uri, name, "2", reason="r2", actor="a")
    registry.set_champion(uri, name, "3", reason="r3", actor="a")
    back = registry.rollback(uri, name, reason="regression in prod", actor="oncall")
    assert (back.version, back.previous, back.promoted) == ("2", "3", True)
    assert back.reason == "rollback: regression in prod"
    assert registry.get_version(uri, name, CHAMPION).version == "2"
    demoted = registry.get_version(uri, name, "3")
    assert demoted.tags[f"{TAG}rollback_reason"] == "regression in prod"
    assert demoted.tags[f"{TAG}rolled_back_by"] == "oncall"
    assert f"{TAG}rolled_back_at" in demoted.tags
    # One more step back: version 2 replaced version 1.
    assert registry.rollback(uri, name, reason="again", actor="oncall").version == "1"


def test_rollback_with_no_previous_champion_raises(uri, name, three_versions):
    with pytest.raises(RegistryError, match="replaced no earlier champion"):
        registry.rollback(uri, name, reason="r", actor="a")
    assert registry.get_version(uri, name, CHAMPION).version == "1"


def test_rollback_with_no_champion_raises(uri, experiment, name, tmp_path):
    register(uri, experiment, name, fake_model(tmp_path / "m", b"y" * 8), 0)
    with pytest.raises(RegistryError):
        registry.rollback(uri, name, reason="r", actor="a")


def test_materialize_downloads_and_verifies(uri, name, three_versions, tmp_path):
    store = tmp_path / "store"
    info = registry.get_version(uri, name, "2")
    target = registry.materialize(uri, info, store)
    assert target == store / name / "v2"
    assert (target / "model.safetensors").read_bytes() == bytes([1]) * 32
    assert model_sha256(target) == info.tags[f"{TAG}model_sha256"]
    assert read_metadata(target)["source"] == f"models:/{name}/2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["v2"]  # no staging folder left behind
    # Second call uses the verified cache.
    assert registry.materialize(uri, info, store) == target
    # A local artifact is linked, not copied: the store's copy costs no disk beside it.
    artifact = Path(info.source.removeprefix("file://"))
    assert (target / "model.safetensors").stat().st_ino == (artifact / "model.safetensors").stat().st_ino


def test_materialize_copies_where_no_link_can_be_made(uri, name, three_versions, tmp_path, monkeypatch):
    def cross_device(source, destination):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(registry.os, "link", cross_device)
    info = registry.get_version(uri, name, "2")
    target = registry.materialize(uri, info, tmp_path / "store")
    artifact = Path(info.source.removeprefix("file://"))
    assert (target / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()
    assert (target / "model.safetensors").stat().st_ino != (artifact / "model.safetensors").stat().st_ino
    assert model_sha256(target) == info.tags[f"{TAG}model_sha256"]


def test_materialize_refuses_a_mismatching_download(uri, experiment, name, tmp_path):
    folder = fake_model(tmp_path / "m", b"z" * 16)
    client = registry.client(uri)
    run = client.create_run(experiment)
    info = registry.register_model_dir(uri, name, folder, run.info.run_id,
                                       tags={f"{TAG}model_sha256": "0" * 64}, description="wrong sha")
    store = tmp_path / "store"
    with pytest.raises(ModelError, match="downloaded sha256 .* != registered 000000000000"):
        registry.materialize(uri, info, store)
    assert not (store / name / f"v{info.version}").exists()
    assert list((store / name).iterdir()) == []  # the staging folder was cleaned up


def test_materialize_refuses_a_tampered_cache(uri, name, three_versions, tmp_path):
    store = tmp_path / "store"
    info = registry.get_version(uri, name, "1")
    target = registry.materialize(uri, info, store)
    # Replaced, not written in place: the store's copy is linked to the registered artifact.
    (target / "model.safetensors").unlink()
    (target / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="model.safetensors does not match its recorded checksum"):
        registry.materialize(uri, info, store)
    assert (target / METADATA_FILE).is_file()


def test_find_round_version(uri, name, three_versions):
    assert registry.find_round_version(uri, name, 1).version == "2"
    assert registry.find_round_version(uri, name, 0).aliases == [CHAMPION]  # as get_version reports it
    assert registry.find_round_version(uri, name, 2).version == "3"
    assert registry.find_round_version(uri, name, 5) is None
    assert registry.find_round_version(uri, "nobody", 0) is None


def test_set_champion_refuses_a_version_whose_weights_are_damaged(uri, name, three_versions, tmp_path):
    # The registered artifact of version 3 is truncated after registration (a half-copied artifact store, say).
    artifact = Path(registry.get_version(uri, name, "3").source.removeprefix("file://")) / "model.safetensors"
    artifact.write_bytes(artifact.read_bytes()[:-4])
    with pytest.raises(ModelError, match="differs from registered|!= registered"):
        registry.set_champion(uri, name, "3", reason="r", actor="a", store=tmp_path / "store")
    assert registry.get_version(uri, name, CHAMPION).version == "1"  # never pointed at the damaged version
    assert registry.set_champion(uri, name, "2", reason="r", actor="a", store=tmp_path / "store").promoted
    assert (tmp_path / "store" / name / "v2" / METADATA_FILE).is_file()


def test_rollback_verifies_the_version_it_returns_to(uri, name, three_versions, tmp_path):
    registry.set_champion(uri, name, "2", reason="r", actor="a")
    artifact = Path(registry.get_version(uri, name, "1").source.removeprefix("file://")) / "model.safetensors"
    artifact.write_bytes(b"")
    with pytest.raises(ModelError):
        registry.rollback(uri, name, reason="r", actor="a", store=tmp_path / "store")
    assert registry.get_version(uri, name, CHAMPION).version == "2"
