"""The CTranslate2 generation engine: the round's model folder converted once (cached by its sha256), then batched
decoding in CTranslate2's C++ runtime, which on CPU spends far less time per step outside the matrix products than
``model.generate`` does.

The champion changes every round, so conversion is part of the engine: the first use of a model folder converts it
into ``<cache_dir>/<sha256>-ct2-<version>`` (into a temporary folder first, renamed when complete, so a crashed or
concurrent conversion is never loaded half-written); later uses load the cached copy.

At ``compute_type: float32`` greedy outputs match the transformers engine's (tests compare them token for token);
``int8`` is faster and changes outputs, so it is opt-in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from flywheel.generation import (
    Completion, Progress, Request, SamplingParams, _cut_at_eos, encode_request, eos_token_ids, length_sorted_jobs,
)

MARKER = "flywheel-ct2.json"
CACHE_ENV = "FLYWHEEL_CT2_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flywheel" / "ctranslate2")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def converted_model(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """The CTranslate2 copy of ``model_dir``, converting it on first use; keyed by the model's sha256."""
    import ctranslate2

    from flywheel.models import ModelError, check_model_dir, model_sha256, read_metadata

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    meta = read_metadata(model_dir) or {}
    # The store records the checksum when it writes a model; a plain folder is hashed here (a few seconds).
    sha = meta.get("sha256") or model_sha256(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{sha}-ct2-{ctranslate2.__version__}"
    if _complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}."))
    try:
        try:
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(str(model_dir), low_cpu_mem_usage=True).convert(str(staging), force=True)
        except Exception as error:  # the converter raises many types; all mean this folder cannot be served
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"{model_dir}: CTranslate2 cannot convert this model: {message}") from error
        (staging / MARKER).write_text(json.dumps(
            {"sha256": sha, "source": str(model_dir), "ctranslate2": ctranslate2.__version__}, indent=2))
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # not ours to trust: only complete folders are ever renamed into place
        try:
            os.replace(staging, target)
        except OSError:
            if not _complete(target):  # anything but "another process finished the same conversion first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "model.bin").is_file()


class CTranslate2Engine:
    """Batched generation with a CTranslate2 ``Generator``, in length-sorted batches like the transformers engine."""

    def __init__(self, model_dir: Path, device: str = "cpu", batch_size: int = 32, compute_type: str = "float32",
                 threads: int = 0, cache_dir: Path | None = None):
        import ctranslate2

        from flywheel.models import load_tokenizer

        self.device = "cuda" if device == "cuda" else "cpu"
        supported = ctranslate2.get_supported_compute_types(self.device)
        if compute_type not in supported:
            raise ValueError(f"generation.compute_type {compute_type!r} is not supported by CTranslate2 on "
                             f"{self.device} (supported here: {', '.join(sorted(supported))})")
        self.batch_size = batch_size
        self.compute_type = compute_type
        self.threads = threads or default_threads()
        self.path = converted_model(model_dir, cache_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.eos_ids = eos_token_ids(self.tokenizer, _configured_eos(Path(model_dir)))
        self._generator = None

    def _load(self):
        import ctranslate2

        return ctranslate2.Generator(str(self.path), device=self.device, compute_type=self.compute_type,
                                     intra_threads=self.threads, inter_threads=1)

    def encode(self, request: Request) -> list[int]:
        return encode_request(self.tokenizer, request)

    def generate(
        self, requests: Sequence[Request], samples: int, params: SamplingParams, progress: Progress | None = None
    ) -> list[Completion]:
        import ctranslate2

        encoded = [self.encode(r) for r in requests]
        jobs = length_sorted_jobs(encoded, samples)
        sampling = params.temperature > 0
        if sampling or self._generator is None:
            # CTranslate2 draws from a per-thread generator seeded when its worker thread first samples, and a
            # later set_random_seed does not reach it: a fresh Generator (fresh threads) is the only way to make
            # the same seed give the same samples. One load per sampled call; greedy calls keep the loaded one.
            # CTranslate2 takes a 32-bit seed (a larger one is a TypeError): a nonzero recipe seed or a chunk's
            # seed scales past it.
            ctranslate2.set_random_seed((params.seed * 1_000_003 + 1) % 2**32)
            self._generator = None  # release the old copy before loading the new one
            self._generator = self._load()
        eos = set(self.eos_ids)
        options = dict(
            max_length=params.max_new_tokens, include_prompt_in_result=False, end_token=list(self.eos_ids),
            return_end_token=True, beam_size=1,
        )
        if sampling:
            options.update(sampling_topk=0, sampling_topp=params.top_p, sampling_temperature=params.temperature)
        else:
            options.update(sampling_topk=1)
        results: list[Completion] = []
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            tokens = [self.tokenizer.convert_ids_to_tokens(encoded[i]) for i, _ in batch]
            outputs = self._generator.generate_batch(tokens, **options)
            for (i, s), output in zip(batch, outputs):
                new, finished = _cut_at_eos(list(output.sequences_ids[0])[: params.max_new_tokens], eos)
                text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
                results.append(Completion(request_index=i, sample_index=s, text=text, n_tokens=len(new),
                                          finished=finished))
            if progress:
                progress(len(batch))
        results.sort(key=lambda c: (c.request_index, c.sample_index))
        return results


def _configured_eos(model_dir: Path) -> object:
    """The EOS ids ``model.generate`` would use: generation_config.json's, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return value
    return None
