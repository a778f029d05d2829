"""The server's fault suite: ``lmrt serve`` as a hostile client meets it — bodies that are not JSON a
server should read, fields that contradict themselves, more work than it can hold, connections that
stall, lie or leave, oversized embeddings, and flags out of range. Each case gets the right 4xx with
OpenAI's JSON error body (never a 500, a hang or a traceback in the server's log).

One server (the tiny Llama with a chat template, 2 slots, a queue of 2) takes the suite, but for the
full queue, which needs streams long enough to hold the slots (SmolLM2, 2 slots, a queue of 2): the
first test records its /health and a greedy answer, the last finds them the same and its busy gauges
back at 0. Raw sockets and http.client send what the openai client will not.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")

from serving import Server, wait_for  # noqa: E402
from lmrt import runtime  # noqa: E402

SLOTS, QUEUE, BODY_TIMEOUT = 2, 2, 2
GAUGES = ("llamacpp:requests_processing", "llamacpp:requests_deferred", "lmrt:kv_slots_in_use")
GREEDY = {"prompt": "The capital of France", "max_tokens": 16}
seen: dict = {}  # the first test's answers, for the last


@pytest.fixture(scope="module")
def server(chat_model):
    server = Server(chat_model, "--slots", str(SLOTS), "--max-queue", str(QUEUE), "--ctx-size", "128",
                    "--body-timeout", str(BODY_TIMEOUT))  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(chat_model) -> str:
    return os.path.basename(chat_model)


def post(server: Server, path: str, body, headers: dict | None = None, method: str = "POST") -> tuple[int, dict, object]:
    """(status, headers in lower case, the JSON answer or the text) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return server.request(method, path, data, headers)


def exchange(server: Server, *pieces: bytes, timeout: float = 20, pause: float = 0.2) -> tuple[bytes, bool]:
    """Send ``pieces`` on one raw connection (a pause between them, so the server reads each on its
    own), then read until the server closes it; (what came back, whether it closed within
    ``timeout``)."""
    sock = socket.create_connection((server.host, int(server.port)), timeout=timeout)
    try:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(pause)
            sock.sendall(piece)
        out = b""
        while True:
            try:
                got = sock.recv(65536)
            except socket.timeout:
                return out, False
            if not got:
                return out, True
            out += got
    finally:
        sock.close()


def answer_of(raw: bytes) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def assert_error(status: int, answer, expected: int, code: str | None = None, mentions: str = "") -> None:
    assert status == expected, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"], answer
    if code is not None:
        assert answer["error"]["code"] == code, answer
    assert mentions in answer["error"]["message"], answer


def no_tracebacks(server: Server) -> None:
    assert not [line for line in server.lines if "Traceback" in line or "Exception in ASGI" in line], "".join(server.lines)


def greedy(server: Server, model: str) -> str:
    return server.client().completions.create(model=model, **GREEDY).choices[0].text


def test_first_the_server_answers(server, model, chat_model):
    seen["health"] = post(server, "/health", None, method="GET")[::2]
    seen["greedy"] = greedy(server, model)
    assert seen["health"] == (200, {"status": "ok"})
    assert seen["greedy"] == runtime.Generator(chat_model).generate(GREEDY["prompt"], max_new_tokens=GREEDY["max_tokens"])


# --- body: JSON that a server should not read ---------------------------------------------------


def completion(model: str, **fields) -> bytes:
    return json.dumps({"model": model, "prompt": "hi", "max_tokens": 2, **fields}).encode()


BODIES = [  # (name, body for the model named {m}, the words the message must hold)
    ("nested 10,000 deep", b"[" * 10_000 + b"]" * 10_000, "nested deeper than 64"),
    ("nested 65 deep in a field", b'{"model": "{m}", "prompt": "hi", "user": ' + b"[" * 65 + b"]" * 65 + b"}", "nested deeper than 64"),
    ("NaN", b'{"model": "{m}", "prompt": "hi", "temperature": NaN}', "NaN is not a JSON number"),
    ("Infinity", b'{"model": "{m}", "prompt": "hi", "temperature": -Infinity}', "-Infinity is not a JSON number"),
    ("a float past the largest", b'{"model": "{m}", "prompt": "hi", "temperature": 1e400}', "too large"),
    ("an integer of 5,000 digits", b'{"model": "{m}", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "digits"),
    ("a duplicate key", b'{"model": "{m}", "prompt": "hi", "prompt": "ho"}', "the key 'prompt' appears twice"),
    ("not UTF-8", b'{"model": "{m}", "prompt": "caf\xe9"}', "not UTF-8"),
    ("cut short", b'{"model": "{m}", "prompt": ', "Expecting value"),
]


@pytest.mark.parametrize("name,body,mentions", BODIES, ids=[b[0] for b in BODIES])
def test_bodies_that_are_not_json_to_read_are_400s(server, model, name, body, mentions):
    status, _, answer = post(server, "/v1/completions", body.replace(b"{m}", model.encode()))
    assert_error(status, answer, 400, "invalid_json", mentions)


SURROGATES = [  # (route, body with a lone surrogate escaped, the field named)
    ("/v1/chat/completions", b'{"model": "{m}", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "{m}", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", b'{"model": "{m}", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "{m}", "prompt": ["ok", "\\ud83d"]}', "prompt[1]"),
    ("/v1/completions", b'{"model": "{m}", "prompt": "hi", "stop": "\\udc00"}', "stop"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,where", SURROGATES, ids=[s[2] for s in SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, model, path, body, where):
    status, _, answer = post(server, path, body.replace(b"{m}", model.encode()))
    assert_error(status, answer, 400, "invalid_string", f"'{where}' holds a lone surrogate")
    assert answer["error"]["param"] == re.split(r"[.\[]", where)[0]


def test_a_surrogate_pair_is_text(server, model, chat_model):
    """An escaped pair (one emoji) is text: it is read, not refused."""
    body = b'{"model": "%s", "prompt": "hi \\ud83d\\ude42", "max_tokens": 4}' % model.encode()
    status, _, answer = post(server, "/v1/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == runtime.Generator(chat_model).generate("hi \U0001f642", max_new_tokens=4)


SHAPES = [  # (route, body, status): arrays where objects belong, and the reverse
    ("/v1/completions", [1, 2], 400),
    ("/v1/completions", "a string", 400),
    ("/v1/chat/completions", {"messages": {"role": "user", "content": "hi"}}, 400),
    ("/v1/chat/completions", {"messages": [["user", "hi"]]}, 400),
    ("/v1/completions", {"prompt": "hi", "stream_options": [True], "stream": True}, 400),
    ("/v1/completions", {"prompt": [[1, [2]]]}, 400),
    ("/v1/completions", {"prompt": "hi", "logit_bias": [1, 2]}, 400),
    ("/v1/completions", {"prompt": "hi", "response_format": ["json_object"]}, 400),
]


@pytest.mark.parametrize("path,body,status", SHAPES, ids=[f"{s[0]} {json.dumps(s[1])[:40]}" for s in SHAPES])
def test_values_of_the_wrong_shape_are_400s(server, model, path, body, status):
    if isinstance(body, dict):
        body = {"model": model, **body}
    got, _, answer = post(server, path, body)
    assert_error(got, answer, status)


# --- fields: what contradicts itself or has the wrong type ----------------------------------------

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
FIELDS = [  # (route, fields besides the model, the words the message must hold)
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role must be one of system, developer, user, assistant, tool"),
    ("/v1/chat/completions", {"messages": [{"role": 7, "content": "hi"}]}, "needs a 'role'"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "max_completion_tokens": 4}, "set the same option to different values"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 2}, "set the same option to different values"),
    ("/v1/completions", {"prompt": "hi", "user": 5}, "'user' must be a string"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1e30}, "'max_tokens' must be a positive integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, "max_tokens asks for"),
    ("/v1/completions", {"prompt": "hi", "seed": 10**30}, "'seed' must be"),
    ("/v1/completions", {"prompt": "hi", "n": 10**30, "temperature": 1}, "'n' must be at most"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 10**30}, "'logprobs' must be from 0 to 20"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 10**30}, "'min_tokens' must be"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1" * 5000: 1}}, "is not a token id below"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"\u0661": 1}}, "is not a token id below"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e300}, "'temperature' must be between 0 and 2"),
    ("/v1/completions", {"prompt": [10**30]}, "token ids must be from 0 to"),
]  # fmt: skip


@pytest.mark.parametrize("path,fields,mentions", FIELDS, ids=[f"{json.dumps(f[1])[:60]}" for f in FIELDS])
def test_fields_that_contradict_or_have_the_wrong_type_are_400s(server, model, path, fields, mentions):
    status, _, answer = post(server, path, {"model": model, **fields})
    assert_error(status, answer, 400, mentions=mentions)


def test_max_tokens_twice_with_one_value_is_that_value(server, model):
    client = server.client()
    both = client.completions.create(model=model, prompt="Once", max_tokens=5, extra_body={"max_completion_tokens": 5})
    alone = client.completions.create(model=model, prompt="Once", max_tokens=5)
    assert both.choices[0].text == alone.choices[0].text and both.usage.completion_tokens == alone.usage.completion_tokens


def test_developer_is_read_as_system(server, model):
    """The template writes each role: a developer message renders as a system one."""
    client = server.client()
    answers = {
        role: client.chat.completions.create(model=model, messages=[{"role": role, "content": "Be brief."}, *CHAT], max_tokens=12)
        for role in ("developer", "system")
    }
    assert answers["developer"].usage.prompt_tokens == answers["system"].usage.prompt_tokens
    assert answers["developer"].choices[0].message.content == answers["system"].choices[0].message.content


# --- queue: more work than the server can hold -----------------------------------------------------


def test_more_prompts_than_the_server_holds_is_a_400_naming_the_limit(server, model):
    most = SLOTS + QUEUE
    status, _, answer = post(server, "/v1/completions", {"model": model, "prompt": ["hi"] * 70, "max_tokens": 2})
    assert_error(status, answer, 400, "too_many_prompts", f"70 prompts in one request, more than this server ever holds at once ({SLOTS} slots + a queue of {QUEUE} = {most})")
    assert server.metric("llamacpp:requests_deferred") == 0
    ok = server.client().completions.create(model=model, prompt=["hi"] * most, max_tokens=2)  # as many as it holds: served
    assert len(ok.choices) == most


@pytest.mark.real_model
def test_a_refused_request_leaves_the_queue_at_once_and_503s_carry_retry_after(smollm2):
    """Two long streams hold both slots; a request of three prompts then finds room for two in the
    queue and none for the third: 503 with Retry-After, and its two queued prompts leave at once,
    so the next request of two prompts is queued, and answered once the streams' client leaves.
    (SmolLM2, not the tiny model: its streams of 400 tokens hold the slots for seconds, where the tiny
    model's end within a tenth of one.)"""
    path, model = smollm2[0], "model"
    server = Server(path, "--slots", str(SLOTS), "--max-queue", str(QUEUE), "--ctx-size", "512")
    try:
        conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
        hold = {"model": model, "prompt": ["Once upon", "A long"], "max_tokens": 400, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(hold), headers={"Content-Type": "application/json"})
        streaming = conn.getresponse()
        assert streaming.status == 200 and streaming.readline().startswith(b"data: ")
        wait_for(lambda: server.metric("llamacpp:requests_processing") == 2 and server.metric("llamacpp:requests_deferred") == 0,
                 "both held prompts to run")  # fmt: skip
        status, headers, answer = post(server, "/v1/completions", {"model": model, "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert_error(status, answer, 503, "server_busy", "busy")
        assert headers["retry-after"] == "1"
        assert server.metric("llamacpp:requests_deferred") == 0
        assert server.metric("llamacpp:requests_processing") == 2  # the streams still hold the slots
        queued: list = []
        asking = threading.Thread(target=lambda: queued.append(server.client().completions.create(model=model, prompt=["Small", "Big"], max_tokens=3)))
        asking.start()
        wait_for(lambda: server.metric("llamacpp:requests_deferred") == 2, "the next request's prompts to be queued")
        conn.sock.shutdown(socket.SHUT_RDWR)  # the streams' client leaves: their slots go to the queue
        conn.close()
        asking.join(60)
        gen = runtime.Generator(path)
        assert [c.text for c in queued[0].choices] == [gen.generate(p, max_new_tokens=3) for p in ("Small", "Big")]
        no_tracebacks(server)
    finally:
        server.stop()


@pytest.mark.real_model
def test_a_loading_server_answers_503_with_retry_after(smollm2):
    proc = subprocess.Popen([sys.executable, "-m", "lmrt", "serve", smollm2[0], "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"listening on (http://\S+);", proc.stderr.readline()).group(1)
        for path in ("/health", "/v1/models"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + path, timeout=10)
            assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1", path
    finally:
        proc.terminate()
        proc.wait(15)


# --- connection: bodies that stall, requests that are not HTTP, clients that leave -------------------


def test_a_body_shorter_than_its_length_gets_408_and_the_connection_closed(server, model):
    start = time.monotonic()
    raw, closed = exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"model\": ", timeout=BODY_TIMEOUT + 10)  # fmt: skip
    assert closed and time.monotonic() - start < BODY_TIMEOUT + 5
    status, headers, answer = answer_of(raw)
    assert_error(status, answer, 408, "request_timeout", f"within {BODY_TIMEOUT} s")
    assert headers["connection"] == "close"


def test_a_client_that_leaves_mid_body_leaves_no_traceback(server, model):
    sock = socket.create_connection((server.host, int(server.port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo")
    time.sleep(0.3)
    sock.close()
    time.sleep(0.5)
    assert post(server, "/health", None, method="GET")[0] == 200
    no_tracebacks(server)


NOT_HTTP = [  # (name, what is sent in pieces, status, code)
    ("a garbage request line", (b"HELLO WORLD\r\n\r\n",), 400, "invalid_http"),
    ("a bad Content-Length", (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",), 400, "invalid_http"),
    ("a bad chunk", (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",), 400, "invalid_http"),
    ("a 100 KB URL in pieces", (b"GET /" + b"a" * 70_000, b"a" * 30_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414, "uri_too_long"),
    ("a 100 KB URL at once", (b"GET /v1/models?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",), 414, "uri_too_long"),
    ("a 20 KB path", (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",), 414, "uri_too_long"),
    ("100 KB of headers", (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000, b"a" * 30_000 + b"\r\n\r\n"), 431, "headers_too_large"),
]  # fmt: skip


@pytest.mark.parametrize("name,pieces,status,code", NOT_HTTP, ids=[n[0] for n in NOT_HTTP])
def test_requests_that_are_not_http_get_a_json_error(server, name, pieces, status, code):
    raw, closed = exchange(server, *pieces)
    assert closed
    got, headers, answer = answer_of(raw)
    assert_error(got, answer, status, code)
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("method,path", [("GET", "/v1/completions"), ("DELETE", "/v1/chat/completions"), ("PUT", "/health"),
                                         ("OPTIONS", "/v1/models"), ("POST", "/metrics")])  # fmt: skip
def test_other_methods_are_405s(server, method, path):
    status, _, answer = post(server, path, None, method=method)
    assert_error(status, answer, 405, mentions=f"{method} is not allowed on {path}")


def test_headers_that_say_other_things_change_nothing(server, model):
    """A body is JSON whatever its Content-Type says; odd headers are ignored."""
    body = {"model": model, **GREEDY}
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Accept": "image/png", "X-Forwarded-For": "1.2.3.4", "Authorization": "Bearer ignored"}):  # fmt: skip
        status, _, answer = post(server, "/v1/completions", body, headers)
        assert status == 200 and answer["choices"][0]["text"] == seen["greedy"], headers


def test_a_stream_client_that_leaves_mid_stream_frees_its_slot(server, model):
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    body = {"model": model, "messages": CHAT, "max_tokens": 80, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline()  # a few lines of the stream, then the client leaves
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: all(server.metric(g) == 0 for g in GAUGES), "the left stream's slot to be given back")
    no_tracebacks(server)


def test_a_hundred_silent_connections_do_not_stop_the_others(server, model):
    socks = [socket.create_connection((server.host, int(server.port)), timeout=10) for _ in range(100)]
    try:
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(greedy(server, model))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == [seen["greedy"]] * 4
        assert post(server, "/health", None, method="GET")[::2] == (200, {"status": "ok"})
    finally:
        for s in socks:
            s.close()


# --- embeddings: inputs past the model's length or OpenAI's limits --------------------------------


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """(server, encoder, Hugging Face tokenizer) of a tiny sentence-transformers model (48 tokens)."""
    from test_encoders import make_sentence_transformer
    from transformers import AutoTokenizer

    from lmrt.export import export_model

    root = tmp_path_factory.mktemp("fault-embedder")
    source = make_sentence_transformer("bert", root, "mean", True)
    exported = str(root / "embedder")
    export_model(source, exported, progress=lambda _: None)
    server = Server(exported)
    yield server, runtime.Encoder(exported), AutoTokenizer.from_pretrained(source)
    server.stop()


LONG_TEXT = "the capital of France is Paris and the capital of Italy is Rome " * 6


def embed(server: Server, **fields) -> tuple[int, dict]:
    status, _, answer = post(server, "/v1/embeddings", {"model": "embedder", **fields})
    return status, answer


def test_a_long_text_and_a_long_id_list_are_both_refused(embedder):
    server, encoder, _ = embedder
    text_ids = encoder.tokenize_keeping_last([LONG_TEXT], None)[0]
    assert len(text_ids) > encoder.max_length
    for given, length in ((LONG_TEXT, len(text_ids)), ([list(range(5, 105))], 100)):
        status, answer = embed(server, input=given)
        assert_error(status, answer, 400, "context_length_exceeded", f"input 0 has {length} tokens, more than the model's 48")
        assert "truncate_prompt_tokens" in answer["error"]["message"]


def test_truncate_prompt_tokens_keeps_the_last_tokens_as_vllm_does(embedder):
    server, encoder, tokenizer = embedder
    tokenizer.truncation_side = "left"
    for keep, expected_length in ((-1, 48), (20, 20)):
        status, answer = embed(server, input=[LONG_TEXT, "short"], truncate_prompt_tokens=keep)
        assert status == 200, answer
        ids = tokenizer([LONG_TEXT, "short"], truncation=True, max_length=expected_length)["input_ids"]
        assert len(ids[0]) == expected_length
        np.testing.assert_allclose([d["embedding"] for d in answer["data"]], encoder.run_ids(ids), atol=1e-6)
        assert answer["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    long_ids = list(range(5, 105))
    status, answer = embed(server, input=[long_ids], truncate_prompt_tokens=30)
    assert status == 200
    np.testing.assert_allclose(answer["data"][0]["embedding"], encoder.run_ids([long_ids[-30:]])[0], atol=1e-6)


@pytest.mark.parametrize("keep", [0, -2, 49, "all", 2.5])
def test_truncate_prompt_tokens_out_of_range_is_a_400(embedder, keep):
    status, answer = embed(embedder[0], input="hi", truncate_prompt_tokens=keep)
    assert_error(status, answer, 400, mentions="'truncate_prompt_tokens' must be")


def test_truncate_prompt_tokens_that_leaves_no_room_for_text_is_a_400(embedder):
    status, answer = embed(embedder[0], input=LONG_TEXT, truncate_prompt_tokens=2)  # [CLS] and [SEP] alone
    assert_error(status, answer, 400, mentions="leaves no room for text beside the 2 special tokens")


def test_more_than_2048_inputs_is_a_400(embedder):
    status, answer = embed(embedder[0], input=["x"] * 2049)
    assert_error(status, answer, 400, mentions="'input' has 2049 inputs, more than 2048 per request")
    status, answer = embed(embedder[0], input=["x"] * 2048)
    assert status == 200 and len(answer["data"]) == 2048


def test_a_lone_surrogate_in_embeddings_input_is_a_400(embedder):
    status, _, answer = post(embedder[0], "/v1/embeddings", b'{"model": "embedder", "input": ["fine", "\\ud800"]}')
    assert_error(status, answer, 400, "invalid_string", "'input[1]' holds a lone surrogate")
    assert post(embedder[0], "/health", None, method="GET")[0] == 200
    no_tracebacks(embedder[0])


# --- CLI: flags out of range --------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--port", "99999"], "--port must be from 0 to 65535 (0: any free port), got 99999"),
    (["--port", "-1"], "--port must be from 0 to 65535"),
    (["--body-timeout", "0"], "--body-timeout must be a number of seconds above 0, got 0.0"),
    (["--body-timeout", "nan"], "--body-timeout must be a number of seconds above 0"),
])  # fmt: skip
def test_serve_flags_out_of_range_are_one_line(chat_model, args, message):
    proc = subprocess.run([sys.executable, "-m", "lmrt", "serve", chat_model, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"error: {message}"), proc.stderr


# --- last: the server is as it was -----------------------------------------------------------------


def test_last_the_server_answers_as_before_and_is_idle(server, model):
    assert "greedy" in seen, "run the whole file: the first test records the answers"
    wait_for(lambda: all(server.metric(g) == 0 for g in GAUGES), "the busy gauges to return to 0")
    assert post(server, "/health", None, method="GET")[::2] == seen["health"]
    assert greedy(server, model) == seen["greedy"]
    no_tracebacks(server)
    assert server.proc.poll() is None

