"""A fake OpenAI-compatible chat server on 127.0.0.1 (stdlib http.server in a thread, free port) for engine and
judge tests. ``reply(body, call)`` decides each answer: a dict is sent as JSON with status 200, ``(status, payload)``
sets the status, a str or bytes payload is sent raw, and ``Hang(seconds)`` waits before answering."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Hang:
    seconds: float
    then: Any = None  # what to answer after the wait (if the client still listens)


def chat_answer(texts: list[str], finish: str | list[str] = "stop", completion_tokens: int | None = None) -> dict:
    finishes = [finish] * len(texts) if isinstance(finish, str) else finish
    answer: dict[str, Any] = {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                    for k, (text, reason) in enumerate(zip(texts, finishes))],
    }
    if completion_tokens is not None:
        answer["usage"] = {"prompt_tokens": 1, "completion_tokens": completion_tokens,
                           "total_tokens": completion_tokens + 1}
    return answer


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


class FakeOpenAI:
    def __init__(self, reply: Callable[[dict, int], Any]):
        self.reply = reply
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    call = len(fake.bodies)
                    fake.bodies.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.paths.append(self.path)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    answer = fake.reply(body, call)
                    if isinstance(answer, Hang):
                        time.sleep(answer.seconds)
                        answer = answer.then if answer.then is not None else chat_answer(["late"])
                finally:
                    # Counted out before the answer goes back, so the client's next request cannot overlap it.
                    with fake._lock:
                        fake.in_flight -= 1
                try:
                    status, payload = answer if isinstance(answer, tuple) else (200, answer)
                    data = payload if isinstance(payload, bytes) else (
                        payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def calls(self) -> int:
        return len(self.bodies)


@contextmanager
def fake_openai(reply: Callable[[dict, int], Any]) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(reply)
    fake._thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
