import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flywheel.models import (
    METADATA_FILE,
    ModelError,
    atomic_write_text,
    check_model_dir,
    load_model,
    load_tokenizer,
    model_sha256,
    provision_base,
    read_metadata,
    save_model,
    verify_model,
    weight_files,
    write_metadata,
)


def _fake_model(folder: Path, *, config=True, weights=True, tokenizer=True) -> Path:
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text('{"model_type": "llama"}')
    if weights:
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


@pytest.mark.parametrize(
    "parts,expected",
    [
        (None, "model folder not found"),
        ({"config": False}, "no config.json"),
        ({"weights": False}, "no weights"),
        ({"tokenizer": False}, "no tokenizer"),
    ],
    ids=["missing-folder", "no-config", "no-weights", "no-tokenizer"],
)
def test_check_model_dir_names_folder_and_problem(tmp_path, parts, expected):
    folder = tmp_path / "model"
    if parts is not None:
        _fake_model(folder, **parts)
    with pytest.raises(ModelError, match=expected) as caught:
        check_model_dir(folder)
    assert str(folder) in str(caught.value)


def test_check_model_dir_accepts_a_complete_folder(tmp_path, tiny_model_dir):
    check_model_dir(_fake_model(tmp_path / "fake"))
    check_model_dir(tiny_model_dir)
    assert [p.name for p in weight_files(tiny_model_dir)] == ["model.safetensors"]


def test_model_sha256_tracks_weights_and_tokenizer_but_not_other_files(model_copy):
    original = model_sha256(model_copy)
    assert len(original) == 64 and original == model_sha256(model_copy)
    (model_copy / "README.md").write_text("notes")
    (model_copy / "generation_config.json").write_text("{}")
    assert model_sha256(model_copy) == original
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = model_sha256(model_copy)
    assert changed != original
    tokenizer_config = model_copy / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text() + " ")
    assert model_sha256(model_copy) not in (original, changed)


def test_model_sha256_depends_on_file_names(tmp_path):
    a = _fake_model(tmp_path / "a")
    b = _fake_model(tmp_path / "b")
    assert model_sha256(a) == model_sha256(b)
    (b / "model.safetensors").rename(b / "pytorch_model.bin")
    assert model_sha256(a) != model_sha256(b)


def test_save_model_writes_metadata_and_verifies(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    target = tmp_path / "store" / "saved"
    ref = save_model(model, tokenizer, target, source="test", round=3)
    assert Path(ref.path) == target and ref.source == "test"
    meta = read_metadata(target)
    files = meta.pop("files")
    assert meta == {"sha256": ref.sha256, "source": "test", "round": 3}
    assert set(files) == {p.name for p in target.iterdir() if p.name != METADATA_FILE}
    assert files["model.safetensors"] == hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
    assert ref.sha256 == model_sha256(target)
    assert verify_model(target) == ref
    # Staged then renamed: nothing else is left beside the target.
    assert sorted(p.name for p in target.parent.iterdir()) == ["saved"]
    # Saving again over an existing folder replaces it.
    again = save_model(model, tokenizer, target, source="again")
    assert again.sha256 == ref.sha256 and read_metadata(target)["source"] == "again"


def test_verify_model_refuses_a_tampered_weight_file(model_copy):
    recorded = write_metadata(model_copy, source="copy")
    assert verify_model(model_copy).sha256 == recorded.sha256
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model.safetensors does not match its recorded checksum") as caught:
        verify_model(model_copy)
    assert str(model_copy) in str(caught.value)


@pytest.fixture
def hashings(monkeypatch) -> list[Path]:
    """The folders whose files are read and hashed, in order (a remembered digest reads nothing)."""
    from flywheel import models

    hashed, hash_files = [], models._hash_files
    monkeypatch.setattr(models, "_DIGESTS", {})
    monkeypatch.setattr(models, "_hash_files", lambda paths, identity: hashed.append(paths[0].parent) or
                        hash_files(paths, identity))
    return hashed


def test_verified_digests_are_remembered_until_a_file_changes(model_copy, hashings, monkeypatch):
    from flywheel import models

    monkeypatch.setattr(models, "_SETTLED_NS", 0)  # the copy's files count as settled at once
    recorded = write_metadata(model_copy, source="copy")
    load_model(model_copy)  # verifies before loading
    assert verify_model(model_copy) == verify_model(model_copy)
    assert verify_model(model_copy).sha256 == model_sha256(model_copy) == recorded.sha256
    assert hashings == [model_copy]  # hashed once, for the metadata; every later check used it
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))  # same size, new times
    with pytest.raises(ModelError, match="model.safetensors does not match its recorded checksum"):
        verify_model(model_copy)
    assert hashings == [model_copy, model_copy]


def test_recently_changed_files_are_hashed_at_every_check(model_copy, hashings):
    write_metadata(model_copy, source="copy")  # its files were copied a moment ago: within the settling time
    verify_model(model_copy)
    verify_model(model_copy)
    assert hashings == [model_copy] * 3


def test_digests_of_large_files_match_hashlib(tmp_path):
    folder = _fake_model(tmp_path / "large")
    payload = bytes(range(256)) * (20 * 4096 + 7)  # about 20 MB: several chunks of both digests in flight
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "README.md").write_text("not part of the identity")
    expected = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        expected.update(name.encode() + b"\0" + (folder / name).read_bytes())
    recorded = write_metadata(folder, source="large")
    assert recorded.sha256 == expected.hexdigest()
    files = read_metadata(folder)["files"]
    assert files["model.safetensors"] == hashlib.sha256(payload).hexdigest()
    assert files["README.md"] == hashlib.sha256(b"not part of the identity").hexdigest()


def test_verify_model_names_a_swapped_tokenizer(model_copy):
    write_metadata(model_copy, source="copy")
    tokenizer = model_copy / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<unk>"', '"<unknown>"', 1) + " ")
    with pytest.raises(ModelError, match="tokenizer.json does not match its recorded checksum"):
        verify_model(model_copy)


def test_verify_model_names_a_missing_and_an_added_file(model_copy):
    write_metadata(model_copy, source="copy")
    (model_copy / "generation_config.json").unlink()
    with pytest.raises(ModelError, match="generation_config.json is missing"):
        verify_model(model_copy)
    write_metadata(model_copy, source="copy")
    (model_copy / "extra.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelError, match="extra.bin is not recorded"):
        verify_model(model_copy)


def test_load_model_verifies_a_recorded_folder(model_copy):
    write_metadata(model_copy, source="copy")
    load_model(model_copy)
    with (model_copy / "model.safetensors").open("r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 16)  # a truncated copy, as a full disk or a killed copy leaves
    with pytest.raises(ModelError, match="model.safetensors does not match"):
        load_model(model_copy)


def test_verify_model_without_metadata(model_copy):
    assert not (model_copy / METADATA_FILE).exists()
    with pytest.raises(ModelError, match=METADATA_FILE):
        verify_model(model_copy)


def test_provision_base_with_a_local_folder(tiny_model_dir, tmp_path):
    ref = provision_base(str(tiny_model_dir), tmp_path / "store")
    assert ref.sha256 == model_sha256(tiny_model_dir)
    assert Path(ref.path) == tiny_model_dir.resolve()
    assert ref.source == str(tiny_model_dir.resolve())
    assert not (tmp_path / "store").exists()  # a local folder is used in place, not copied


def test_provision_base_resolves_relative_paths_against_base_dir(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    ref = provision_base("models/tiny", tmp_path / "store", base_dir=tmp_path)
    assert Path(ref.path) == (tmp_path / "models" / "tiny").resolve()
    assert ref.sha256 == model_sha256(tiny_model_dir)


def test_provision_base_local_folder_must_be_a_model(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        provision_base(str(_fake_model(tmp_path / "m", config=False)), tmp_path / "store")


def test_unknown_builtin_lists_available(tmp_path):
    with pytest.raises(ModelError, match="unknown builtin model 'gpt-17'") as caught:
        provision_base("builtin:gpt-17", tmp_path / "store")
    assert "smollm2-135m-instruct" in str(caught.value)
    assert not (tmp_path / "store").exists()


def test_atomic_write_text_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic_write_text(target, json.dumps({"a": 1}))
    atomic_write_text(target, json.dumps({"a": 2}))
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
