import socket
from pathlib import Path

import pytest
from fake_openai import Hang, chat_answer, fake_openai, user_text

from flywheel.config import ConfigError, parse_config
from flywheel.generation import EngineError, SamplingParams, make_engine, user_request
from flywheel.openai_engine import OpenAIEngine

PARAMS = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=3)
REQUESTS = [user_request("first prompt"), user_request("second prompt")]


def _engine(url: str, **options) -> OpenAIEngine:
    options = {"model": "policy", "timeout_s": 5.0, "retries": 2, "backoff_s": 0.0, **options}
    return OpenAIEngine(url, options.pop("model"), **options)


def _echo(body: dict, call: int) -> dict:
    """n answers that name their prompt and sample; the second sample runs into the token limit."""
    n = body.get("n", 1)
    texts = [f"  answer to {user_text(body)} #{k}  " for k in range(n)]
    return chat_answer(texts, finish=["stop", "length", "stop"][:n] if n <= 3 else "stop", completion_tokens=7 * n)


def test_n_samples_per_request_map_to_completions():
    with fake_openai(_echo) as server:
        progress: list[int] = []
        completions = _engine(server.url).generate(REQUESTS, 3, PARAMS, progress.append)
    assert server.calls == 2 and sorted(progress) == [3, 3]
    assert [(c.request_index, c.sample_index) for c in completions] == [(r, s) for r in range(2) for s in range(3)]
    assert completions[0].text == "answer to first prompt #0"  # stripped
    assert completions[4].text == "answer to second prompt #1"
    assert [c.finished for c in completions[:3]] == [True, False, True]  # finish_reason "length" is not finished
    assert sum(c.n_tokens for c in completions[:3]) == 21  # usage shared out over the choices
    body = next(b for b in server.bodies if user_text(b) == "first prompt")  # requests run concurrently
    assert set(server.paths) == {"/v1/chat/completions"}
    assert body["model"] == "policy" and body["n"] == 3 and body["max_tokens"] == 16
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["messages"] == [{"role": "user", "content": "first prompt"}]
    assert body["seed"] == 3 * 1_000_003
    assert {b["seed"] for b in server.bodies} == {3 * 1_000_003, 3 * 1_000_003 + 1_000}


def test_one_request_per_sample_when_the_server_answers_one_choice():
    with fake_openai(_echo) as server:
        completions = _engine(server.url, batch_samples=False).generate(REQUESTS, 2, PARAMS)
    assert server.calls == 4 and all(b["n"] == 1 for b in server.bodies)
    assert len({b["seed"] for b in server.bodies}) == 4  # every sample draws its own
    assert [(c.request_index, c.sample_index) for c in completions] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(c.n_tokens == 7 for c in completions)


def test_greedy_sends_temperature_zero_and_no_top_p():
    with fake_openai(_echo) as server:
        _engine(server.url).generate(REQUESTS[:1], 1, SamplingParams(max_new_tokens=4))
    assert server.bodies[0]["temperature"] == 0.0 and "top_p" not in server.bodies[0]


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TEST_KEY", "sekret")
    with fake_openai(_echo) as server:
        _engine(server.url, api_key_env="FLYWHEEL_TEST_KEY").generate(REQUESTS[:1], 1, PARAMS)
    assert server.headers[0]["Authorization"] == "Bearer sekret"
    monkeypatch.delenv("FLYWHEEL_TEST_KEY")
    with pytest.raises(EngineError, match="FLYWHEEL_TEST_KEY"):
        _engine("http://127.0.0.1:9/v1", api_key_env="FLYWHEEL_TEST_KEY")


def test_engine_selection_by_config():
    with fake_openai(_echo) as server:
        config = parse_config({"generation": {"engine": "openai", "samples_per_prompt": 2,
                                              "openai": {"base_url": server.url + "/", "model": "served-policy"}}})
        gen = config.generation
        engine = make_engine(gen.engine, Path("unused"), "cpu", gen.batch_size, endpoint=gen.openai)
        assert isinstance(engine, OpenAIEngine)
        completions = engine.generate(REQUESTS, gen.samples_per_prompt, PARAMS)
    assert len(completions) == 4 and server.bodies[0]["model"] == "served-policy"
    assert engine.url == server.url + "/chat/completions"


@pytest.mark.parametrize("generation,fragment", [
    ({"engine": "openai"}, "needs an openai section"),
    ({"openai": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}}, "engine is 'transformers'"),
    ({"engine": "openai", "openai": {"base_url": "127.0.0.1:8000", "model": "m"}}, "http:// or https://"),
    ({"engine": "openai", "openai": {"base_url": "http://h/v1", "model": "m", "api_key": "x"}}, "unknown key"),
])
def test_openai_engine_config_errors(generation, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config({"generation": generation})


def test_timeout_is_retried_then_fails_with_one_line_naming_the_url():
    with fake_openai(lambda body, call: Hang(1.0)) as server, pytest.raises(EngineError) as caught:
        _engine(server.url, timeout_s=0.2, retries=2).generate(REQUESTS[:1], 1, PARAMS)
    message = str(caught.value)
    assert server.calls == 3
    assert message.startswith(server.url + "/chat/completions: ")
    assert "timeout of 0.2 s" in message and "3 attempts" in message and "\n" not in message


def test_server_error_then_success_is_retried():
    def flaky(body: dict, call: int):
        return (500, "upstream overloaded") if call == 0 else _echo(body, call)

    with fake_openai(flaky) as server:
        completions = _engine(server.url).generate(REQUESTS[:1], 2, PARAMS)
    assert server.calls == 2 and [c.text for c in completions] == ["answer to first prompt #0",
                                                                  "answer to first prompt #1"]


def test_client_error_is_not_retried():
    refusal = (400, '{"error": {"message": "unknown model"}}')
    with fake_openai(lambda body, call: refusal) as server, \
            pytest.raises(EngineError, match=r"HTTP 400 \(not retried\).*unknown model"):
        _engine(server.url).generate(REQUESTS[:1], 1, PARAMS)
    assert server.calls == 1


@pytest.mark.parametrize("payload,fragment", [
    ("<html>gateway says hello</html>", "answer is not JSON: <html>gateway"),
    ("", "not JSON: (empty body)"),
    ({"result": "hi"}, "no 'choices' list"),
    ({"choices": []}, "empty 'choices'"),
    ({"choices": [{"message": {"role": "assistant"}, "finish_reason": "stop"}] * 2}, "choice 0 has no message content"),
    (chat_answer(["only one"]), "asked for 2 choices, got 1 (set batch_samples: false"),
])
def test_garbage_answers_give_a_clear_error(payload, fragment):
    with fake_openai(lambda body, call: payload) as server, pytest.raises(EngineError) as caught:
        _engine(server.url).generate(REQUESTS[:1], 2, PARAMS)
    message = str(caught.value)
    assert fragment in message and message.startswith(server.url) and "\n" not in message
    assert server.calls == 1  # a malformed answer is not retried


def test_connection_refused_is_retried_and_named():
    with socket.socket() as probe:  # a free port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: connection failed.*2 attempts"):
        _engine(f"http://127.0.0.1:{port}/v1", retries=1).generate(REQUESTS[:1], 1, PARAMS)


def test_concurrency_is_bounded():
    def slow(body: dict, call: int):
        return Hang(0.15, then=_echo(body, call))

    with fake_openai(slow) as server:
        completions = _engine(server.url, max_concurrency=2).generate([user_request(f"p{i}") for i in range(6)], 1,
                                                                      PARAMS)
    assert len(completions) == 6 and server.calls == 6
    assert server.max_in_flight <= 2
