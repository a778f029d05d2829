"""The clients people point at a local server, against one real ``lmrt serve`` on SmolLM2-135M-Instruct
quantized to int8: the openai SDK, langchain-openai, litellm, instructor, llm and lm-evaluation-harness.
Every answer is compared with the Generator's own on the same model, for the very request the client
sent (recorded on its HTTP client); structured answers are validated against their schema.

The clients come with the ``clients`` extra (scripts/setup.sh installs it); without it these tests
skip, and fail under LMRT_REQUIRE_REAL_MODEL=1. They talk to 127.0.0.1 only: litellm reads its bundled
cost map, Hugging Face libraries stay offline, tracing and plugins are off."""

from __future__ import annotations

import importlib
import json
import os

import pytest

openai = pytest.importorskip("openai")

from serving import Server  # noqa: E402
from lmrt import runtime  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.clients]

NAME = "smollm2-int8"  # the model's id on the server: its directory's name
TOKENS = 24  # the budget of free-text answers
STRUCTURED_TOKENS = 80  # the budget of JSON answers and tool calls
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EXTRACT = [{"role": "user", "content": "Extract the city: Rome is the capital of Italy."}]  # JSON answers: one clear
# answer (with a schema that allows more keys, the reply to QUESTION is near a tie between two names)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False},
}}  # fmt: skip
# Offline and local: set before any client is imported (litellm reads its cost map at import).
CLIENT_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
    "LLM_LOAD_PLUGINS": "",
    "OPENAI_API_KEY": "none",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def client_module(name: str):
    """Import one of the clients; a missing one skips, or fails where the real tests are required."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        message = f"{name} is not installed ({e}): pip install -e '.[clients]' (scripts/setup.sh)"
        if os.environ.get("LMRT_REQUIRE_REAL_MODEL"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module", autouse=True)
def offline_clients(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CLIENT_ENV.items():
            patch.setenv(key, value)
        cache = tmp_path_factory.mktemp("client-caches")
        patch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
        patch.setenv("HF_HOME", str(cache / "hf"))
        yield


@pytest.fixture(scope="module")
def int8_model(smollm2, tmp_path_factory):
    """SmolLM2 quantized to int8, in a directory named after the model id the clients ask for."""
    from lmrt.quantize import quantize_directory, scheme_for

    out = str(tmp_path_factory.mktemp("clients") / NAME)
    quantize_directory(smollm2[0], out, scheme_for("int8"), gguf=None, eval_tokens=256, progress=lambda _: None)
    return out


@pytest.fixture(scope="module")
def server(int8_model):
    server = Server(int8_model, "--slots", "2", "--ctx-size", "2048")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gen(int8_model):
    return runtime.Generator(int8_model)


class Recorder:
    """An httpx2 client (what the openai SDK sends with) that keeps the JSON body of every request."""

    def __init__(self):
        import httpx2

        self.bodies: list[dict] = []
        self.http = httpx2.Client(timeout=120, event_hooks={"request": [self._keep]})

    def _keep(self, request) -> None:
        if request.content:
            self.bodies.append(json.loads(request.content))

    @property
    def last(self) -> dict:
        return self.bodies[-1]


@pytest.fixture
def recorder():
    recorder = Recorder()
    yield recorder
    recorder.http.close()


def expected_chat(gen, body: dict) -> str:
    """The Generator's answer to a recorded chat request (greedy, without tools): its messages, its
    budget under either name, its JSON schema when it asks for one."""
    assert not body.get("tools") and body.get("temperature", 0) == 0, body
    options = {"max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens"))}
    fmt = body.get("response_format")
    if fmt is not None:
        assert fmt["type"] == "json_schema", fmt
        options["json_schema"] = fmt["json_schema"]["schema"]
    return gen.chat(body["messages"], **options)


def check_weather_call(name: str, arguments: str | dict) -> dict:
    """A call of get_weather whose arguments match its parameters."""
    import jsonschema

    assert name == "get_weather"
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    return arguments


def city_model():
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        country: str

    return City


# --- the openai SDK ---------------------------------------------------------------------------


def test_openai_chat_and_stream_equal_the_generator(server, gen):
    client = server.client()
    expected = gen.chat(QUESTION, max_new_tokens=TOKENS)
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=TOKENS)
    assert out.choices[0].message.content == expected
    chunks = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_openai_parse_gives_the_pydantic_model(server, gen, recorder):
    City = city_model()
    client = server.client(http_client=recorder.http)
    out = client.chat.completions.parse(model=NAME, messages=EXTRACT, response_format=City, max_tokens=STRUCTURED_TOKENS)
    choice = out.choices[0]
    assert recorder.last["response_format"]["type"] == "json_schema"
    assert choice.finish_reason == "stop" and choice.message.content == expected_chat(gen, recorder.last)
    assert choice.message.parsed == City.model_validate_json(choice.message.content)


def test_openai_tools_give_parsed_tool_calls(server):
    client = server.client()
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL],
            tool_choice=choice, max_tokens=STRUCTURED_TOKENS,
        )  # fmt: skip
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        assert len(calls) == 1 and calls[0].type == "function"
        check_weather_call(calls[0].function.name, calls[0].function.arguments)


def test_openai_parallel_tool_calls_false_gives_one_call(server):
    out = server.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is the weather in Paris and in Rome?"}],
        tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=STRUCTURED_TOKENS,
    )  # fmt: skip
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    check_weather_call(calls[0].function.name, calls[0].function.arguments)


def test_openai_models_retrieve(server):
    client = server.client()
    listed = client.models.list().data
    card = client.models.retrieve(NAME)
    assert [m.id for m in listed] == [NAME] and card.id == NAME and card.object == "model"
    assert card.owned_by == listed[0].owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_openai_responses_create_and_stream(server, gen):
    client = server.client()
    instructions = "Answer in one sentence."
    expected = gen.chat([{"role": "system", "content": instructions}, *QUESTION], max_new_tokens=TOKENS)
    out = client.responses.create(model=NAME, instructions=instructions, input=QUESTION[0]["content"], max_output_tokens=TOKENS)
    assert out.status in ("completed", "incomplete") and out.output_text == expected
    events = list(client.responses.create(
        model=NAME, instructions=instructions, input=QUESTION[0]["content"], max_output_tokens=TOKENS, stream=True,
    ))  # fmt: skip
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-1].response.output_text == expected


def test_openai_completions_echo_scores_the_prompt(server, gen):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = gen.encode(prompt)
    reference = gen.score(ids)
    out = server.client().completions.create(model=NAME, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == prompt and out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == prompt and len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(reference.logprobs.tolist(), abs=1e-4)
    for position, top in enumerate(logprobs.top_logprobs[1:]):  # the best token's logprob at each position
        assert len(top) >= 1 and max(top.values()) >= logprobs.token_logprobs[position + 1] - 1e-4
        assert gen.decode([int(reference.argmax[position])]) in top


# --- langchain-openai -------------------------------------------------------------------------


def chat_openai(server, recorder, **options):
    langchain_openai = client_module("langchain_openai")
    return langchain_openai.ChatOpenAI(
        model=NAME, base_url=server.base + "/v1", api_key="none", temperature=0, max_retries=0, timeout=120,
        http_client=recorder.http, **options,
    )  # fmt: skip


def test_langchain_invoke_and_stream_equal_the_generator(server, gen, recorder):
    chat = chat_openai(server, recorder, max_tokens=TOKENS)
    expected = gen.chat(QUESTION, max_new_tokens=TOKENS)
    assert chat.invoke(QUESTION).content == expected
    assert "".join(chunk.content for chunk in chat.stream(QUESTION)) == expected
    assert expected_chat(gen, recorder.last) == expected


def test_langchain_structured_output_json_schema(server, gen, recorder):
    City = city_model()
    chat = chat_openai(server, recorder, max_tokens=STRUCTURED_TOKENS)
    city = chat.with_structured_output(City, method="json_schema").invoke(EXTRACT)
    assert recorder.last["response_format"]["type"] == "json_schema"
    assert city.model_dump() == City.model_validate_json(expected_chat(gen, recorder.last)).model_dump()


def test_langchain_structured_output_function_calling(server, recorder):
    """langchain sends parallel_tool_calls: false with this method."""
    City = city_model()
    chat = chat_openai(server, recorder, max_tokens=STRUCTURED_TOKENS)
    city = chat.with_structured_output(City, method="function_calling").invoke(EXTRACT)
    assert recorder.last["parallel_tool_calls"] is False and recorder.last["tools"][0]["function"]["name"] == "City"
    assert isinstance(city, City)


def test_langchain_bind_tools(server, recorder):
    chat = chat_openai(server, recorder, max_tokens=STRUCTURED_TOKENS)
    message = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1 and not message.content
    check_weather_call(message.tool_calls[0]["name"], message.tool_calls[0]["args"])
    one = chat.bind_tools([WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False).invoke("Weather in Rome?")
    assert recorder.last["parallel_tool_calls"] is False and len(one.tool_calls) == 1
    check_weather_call(one.tool_calls[0]["name"], one.tool_calls[0]["args"])


def test_langchain_responses_api_invoke(server, gen, recorder):
    chat = chat_openai(server, recorder, max_tokens=TOKENS, use_responses_api=True)
    message = chat.invoke(QUESTION)
    assert "input" in recorder.last and recorder.last["max_output_tokens"] == TOKENS
    assert message.text == gen.chat(QUESTION, max_new_tokens=TOKENS)


# --- litellm ----------------------------------------------------------------------------------


def litellm_options(server) -> dict:
    return dict(model="openai/" + NAME, api_base=server.base + "/v1", api_key="none", timeout=120, num_retries=0)


def test_litellm_completion_and_stream_equal_the_generator(server, gen):
    litellm = client_module("litellm")
    litellm.telemetry = False
    expected = gen.chat(QUESTION, max_new_tokens=TOKENS)
    out = litellm.completion(messages=QUESTION, max_tokens=TOKENS, temperature=0, **litellm_options(server))
    assert out.choices[0].message.content == expected
    chunks = litellm.completion(messages=QUESTION, max_tokens=TOKENS, temperature=0, stream=True, **litellm_options(server))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_litellm_tools(server):
    litellm = client_module("litellm")
    out = litellm.completion(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL],
        tool_choice="required", max_tokens=STRUCTURED_TOKENS, **litellm_options(server),
    )  # fmt: skip
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    check_weather_call(calls[0].function.name, calls[0].function.arguments)


# --- instructor -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_extracts_a_pydantic_model(server, gen, recorder, mode):
    instructor = client_module("instructor")
    City = city_model()
    client = instructor.from_openai(server.client(http_client=recorder.http), mode=getattr(instructor.Mode, mode))
    city = client.chat.completions.create(
        model=NAME, messages=EXTRACT, response_model=City, max_tokens=STRUCTURED_TOKENS, max_retries=0
    )
    assert isinstance(city, City)
    if mode == "JSON_SCHEMA":
        assert city.model_dump() == City.model_validate_json(expected_chat(gen, recorder.last)).model_dump()
    else:
        assert recorder.last["tool_choice"]["function"]["name"] == "City"


# --- llm --------------------------------------------------------------------------------------


def test_llm_prompt_equals_the_generator(server, gen, tmp_path, monkeypatch):
    """An OpenAI-compatible model registered in extra-openai-models.yaml under a temporary
    LLM_USER_PATH; streamed (llm's default) and not."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: lmrt\n  model_name: {NAME}\n  api_base: \"{server.base}/v1\"\n"
    )
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    llm = client_module("llm")
    model = llm.get_model("lmrt")
    question = QUESTION[0]["content"]
    expected = gen.chat(QUESTION, max_new_tokens=TOKENS)
    assert model.prompt(question, max_tokens=TOKENS, temperature=0, key="none").text() == expected
    assert model.prompt(question, max_tokens=TOKENS, temperature=0, key="none", stream=False).text() == expected


# --- lm-evaluation-harness --------------------------------------------------------------------

QUIZ = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "The color of the sky on a clear day is", "choices": ["green", "red", "blue"], "answer": 2},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["cold", "warm", "loud"], "answer": 0},
    {"question": "A week has seven", "choices": ["months", "days", "years"], "answer": 1},
]
MC_TASK = """task: lmrt_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATE_TASK = """task: lmrt_quiz_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def context_of(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


@pytest.fixture(scope="module")
def quiz_tasks(tmp_path_factory):
    """A directory of two lm-eval tasks over a local JSONL quiz: multiple choice and generation."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    data = root / "quiz.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in QUIZ))
    (root / "lmrt_quiz.yaml").write_text(MC_TASK.format(data=data))
    (root / "lmrt_quiz_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    return str(root)


def evaluate(server, tasks_dir: str, task: str, tokenizer_args: str) -> dict:
    lm_eval = client_module("lm_eval")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={NAME},base_url={server.base}/v1/completions,{tokenizer_args},"
        "num_concurrent=1,max_retries=1,timeout=120,max_length=2048",
        tasks=[task], task_manager=TaskManager(include_path=tasks_dir), log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


def tokenizer_args(backend: str, smollm2, tmp_path) -> str:
    """lm-eval's tokenizer: the server's own (/tokenizer_info, /tokenize), or SmolLM2's saved here."""
    if backend == "remote":
        return "tokenizer_backend=remote"
    smollm2[2].save_pretrained(str(tmp_path / "tokenizer"))
    return f"tokenizer_backend=huggingface,tokenizer={tmp_path / 'tokenizer'}"


@pytest.mark.parametrize("backend", ["huggingface", "remote"])
def test_lm_eval_loglikelihood_equals_generator_score(server, gen, smollm2, quiz_tasks, tmp_path, backend):
    """lm-eval scores each choice from echoed prompt logprobs; the same sums from Generator.score give
    the same per-choice loglikelihoods and the same accuracy."""
    results = evaluate(server, quiz_tasks, "lmrt_quiz", tokenizer_args(backend, smollm2, tmp_path))
    correct = []
    samples = sorted(results["samples"]["lmrt_quiz"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUIZ)
    for sample, doc in zip(samples, QUIZ):
        context = gen.encode(context_of(doc), add_special_tokens=False)
        sums = []
        for choice in doc["choices"]:
            whole = gen.encode(context_of(doc) + " " + choice, add_special_tokens=False)
            assert whole[: len(context)] == context
            sums.append(float(gen.score(whole).logprobs[len(context) - 1 :].sum()))
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(sums, abs=1e-3), doc
        correct.append(int(max(range(len(sums)), key=sums.__getitem__) == doc["answer"]))
    assert results["results"]["lmrt_quiz"]["acc,none"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)


def test_lm_eval_generate_until_equals_the_generator(server, gen, smollm2, quiz_tasks, tmp_path):
    results = evaluate(server, quiz_tasks, "lmrt_quiz_generate", tokenizer_args("huggingface", smollm2, tmp_path))
    samples = sorted(results["samples"]["lmrt_quiz_generate"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUIZ)
    for sample, doc in zip(samples, QUIZ):
        ids = gen.encode(context_of(doc), add_special_tokens=False)
        expected = gen.generate(ids, max_new_tokens=12, stop=["\n"])
        assert sample["resps"][0][0] == expected, doc
    matches = [s["resps"][0][0] == d["choices"][d["answer"]] for s, d in zip(samples, QUIZ)]
    assert results["results"]["lmrt_quiz_generate"]["exact_match,none"] == pytest.approx(sum(matches) / len(QUIZ))
