"""The ``openai`` generation engine: any OpenAI-compatible chat server (vLLM, llama.cpp server, a hosted API).

It implements ``flywheel.generation.Engine`` against ``POST {base_url}/chat/completions``. Requests run
concurrently on a bounded thread pool (one shared ``httpx.Client``); each has its own timeout and is retried with
exponential backoff on timeouts, connection errors, HTTP 5xx and 429 (rate limited), never on other 4xx answers,
which a retry cannot fix. The API key is read from the environment variable the config names, never from the config.

Every failure is an ``EngineError`` whose single-line message names the URL and the problem.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from threading import Lock
from typing import Any

from flywheel.generation import Completion, EngineError, Progress, Request, SamplingParams

_BODY_PREVIEW = 120


def _one_line(text: str, limit: int = _BODY_PREVIEW) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _Retryable(Exception):
    """A failure worth another attempt (timeout, connection error, 5xx, 429); the message is the last problem."""


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible server; ``samples`` answers per request.

    With ``batch_samples`` one request asks for ``n = samples`` choices (vLLM and hosted APIs support it); servers
    that answer one choice only (llama.cpp server) need ``batch_samples=False``: one request per sample, each with
    its own seed. ``n_tokens`` is the server's ``usage.completion_tokens`` (shared out over the choices by text
    length when one request holds several), or a whitespace word count when the server reports no usage.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout_s: float = 60.0,
                 retries: int = 2, backoff_s: float = 1.0, max_concurrency: int = 4, batch_samples: bool = True,
                 transport: Any = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.batch_samples = batch_samples
        headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise EngineError(f"{self.url}: environment variable {api_key_env} (api_key_env) is not set or empty")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s), limits=limits,
                                    transport=transport)

    @classmethod
    def from_config(cls, endpoint: Any) -> OpenAIEngine:
        """From a config section with base_url, model, api_key_env, timeout_s, retries, backoff_s, max_concurrency
        and batch_samples (``flywheel.config.EndpointConfig`` or the teacher's section)."""
        return cls(endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env, timeout_s=endpoint.timeout_s,
                   retries=endpoint.retries, backoff_s=endpoint.backoff_s, max_concurrency=endpoint.max_concurrency,
                   batch_samples=endpoint.batch_samples)

    def close(self) -> None:
        self._client.close()

    def generate(
        self, requests: Sequence[Request], samples: int, params: SamplingParams, progress: Progress | None = None
    ) -> list[Completion]:
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        # A job is (request index, first sample index, number of choices asked for).
        if self.batch_samples:
            jobs = [(i, 0, samples) for i in range(len(requests))]
        else:
            jobs = [(i, s, 1) for i in range(len(requests)) for s in range(samples)]
        lock = Lock()

        def run(job: tuple[int, int, int]) -> list[Completion]:
            index, first, count = job
            completions = self._complete(requests[index], index, first, count, params)
            if progress:
                with lock:
                    progress(count)
            return completions

        results: list[Completion] = []
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="openai-engine")
        try:
            for completions in pool.map(run, jobs):
                results.extend(completions)
        except BaseException:
            # The first failure ends the call: requests not yet sent are dropped, not retried one by one.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        results.sort(key=lambda c: (c.request_index, c.sample_index))
        return results

    # --- one request --------------------------------------------------------------------------------------------

    def payload(self, request: Request, request_index: int, first_sample: int, count: int,
                params: SamplingParams) -> dict[str, Any]:
        """The JSON body: sampling parameters mapped to the OpenAI names; greedy is temperature 0."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(message) for message in request.messages],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "n": count,
            # Seeded per request (and per sample when sent one by one) so a re-run draws the same answers where
            # the server honours seeds; kept below 2**31 for servers that take a 32-bit seed.
            "seed": (params.seed * 1_000_003 + request_index * 1_000 + first_sample) % (2**31 - 1),
        }
        if params.temperature > 0:
            body["top_p"] = params.top_p
        return body

    def _complete(self, request: Request, index: int, first: int, count: int,
                  params: SamplingParams) -> list[Completion]:
        body = self.payload(request, index, first, count, params)
        attempts = self.retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                data = self._post(body)
            except _Retryable as error:
                problem = str(error)
                continue
            return self._parse(data, index, first, count)
        raise EngineError(f"{self.url}: {problem} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")

    def _post(self, body: dict[str, Any]) -> Any:
        import httpx

        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException:
            raise _Retryable(f"no answer within the timeout of {self.timeout_s:g} s") from None
        except httpx.TransportError as error:
            raise _Retryable(f"connection failed: {_one_line(error) or type(error).__name__}") from None
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}: {_one_line(response.text)}")
        if status >= 400:
            raise EngineError(f"{self.url}: HTTP {status} (not retried): {_one_line(response.text)}")
        try:
            return response.json()
        except ValueError:
            raise EngineError(f"{self.url}: answer is not JSON: {_one_line(response.text) or '(empty body)'}") from None

    def _parse(self, data: Any, index: int, first: int, count: int) -> list[Completion]:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            raise EngineError(f"{self.url}: answer has no 'choices' list (not an OpenAI chat completion): "
                              f"{_one_line(repr(data))}")
        if not choices:
            raise EngineError(f"{self.url}: answer has empty 'choices'")
        if len(choices) != count:
            hint = " (set batch_samples: false for servers that answer one choice per request)" if count > 1 else ""
            raise EngineError(f"{self.url}: asked for {count} choices, got {len(choices)}{hint}")
        texts, finished = [], []
        for position, choice in enumerate(choices):
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise EngineError(f"{self.url}: choice {position} has no message content: {_one_line(repr(choice))}")
            texts.append(content.strip())
            finished.append(choice.get("finish_reason") == "stop")
        tokens = _share_tokens(data.get("usage"), texts)
        # Choices may come back in any order; their "index" field is not trusted, the sample index is positional.
        return [Completion(request_index=index, sample_index=first + k, text=texts[k], n_tokens=tokens[k],
                           finished=finished[k]) for k in range(len(texts))]


def _share_tokens(usage: Any, texts: list[str]) -> list[int]:
    total = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        return [len(text.split()) for text in texts]
    if len(texts) == 1:
        return [total]
    lengths = [len(text) for text in texts]
    whole = sum(lengths)
    if whole == 0:
        return [total // len(texts)] * len(texts)
    return [round(total * length / whole) for length in lengths]
