"""``lmrt serve --ray``: a Ray cluster started here (head only, 2 CPUs), joined by a real ``lmrt
serve --ray --replicas 2`` process serving the tiny Llama, driven by the official openai client.
Answers are compared with the Generator's own; one replica is killed under load."""

from __future__ import annotations

import collections
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray")

from conftest import random_peft, wait_for_serve_url, wait_until  # noqa: E402
from lmrt import runtime  # noqa: E402

MODEL = "chat-llama"
PROMPT = "The capital of"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL to the process's whole session if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cluster_pids(tmp: str) -> list[int]:
    """The processes whose command line names ``tmp`` (a cluster's own temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if tmp.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            pass
    return pids


class RayServer:
    """A Ray head started with ``ray start --head --block`` (ended by SIGTERM, which stops what it
    started), and ``lmrt serve --ray`` joining it."""

    def __init__(self, model_dir: str, replicas: int):
        self.tmp = tempfile.mkdtemp(prefix="lmrt-ray-", dir="/tmp")  # Ray's socket paths must be short
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.gcs = f"127.0.0.1:{free_port()}"
        self.port = free_port()
        self.metrics_port = free_port()
        self.head = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", self.gcs.split(":")[1], "--num-cpus", "2", "--object-store-memory", "100000000",
             "--include-dashboard", "false", "--metrics-export-port", str(self.metrics_port), "--temp-dir", self.tmp,
             "--disable-usage-stats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env, start_new_session=True,
        )  # fmt: skip
        self.proc = None
        self.lines: list[str] = []
        try:
            self._serve(model_dir, replicas)
        except BaseException:
            self.stop()
            raise

    def _serve(self, model_dir: str, replicas: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmrt", "serve", model_dir, "--ray", "--address", self.gcs, "--replicas", str(replicas),
             "--threads", "1", "--port", str(self.port), "--slots", "4", "--ctx-size", "128", "--prefill-chunk", "16"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True,
        )  # fmt: skip
        base = wait_for_serve_url(self.proc, self.lines, 90)
        if base is None:
            raise RuntimeError("lmrt serve --ray did not start: " + "".join(self.lines[-20:]))
        self.base = base

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=30, **kw)

    def ray_metric(self, name: str) -> dict[str, float]:
        """{replica: value} of one lmrt figure in Ray's Prometheus export."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = {}
        for labels, value in re.findall(rf"^{re.escape(name)}{{(.*)}} (\S+)$", text, re.M):
            found[re.search(r'replica="([^"]+)"', labels).group(1)] = float(value)
        return found

    def on_cluster(self, code: str, timeout: float = 90) -> str:
        """Run ``code`` in a Ray driver process connected to the cluster (``ray`` and ``serve`` are
        imported); its stdout."""
        script = f"import ray\nfrom ray import serve\nray.init(address={self.gcs!r}, logging_level='error', log_to_driver=False)\n{code}"
        done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def kill_replica(self, replica: str) -> None:
        """ray.kill the replica's actor, as a crash would end it."""
        self.on_cluster(
            f"names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if a['name'].endswith('#{replica}')]\n"
            "assert len(names) == 1, names\n"
            "ray.kill(ray.get_actor(names[0], namespace='serve'), no_restart=True)\n"
        )  # fmt: skip

    def wait_for_running(self, count: int, timeout: float) -> dict:
        """The deployment's replica states once ``count`` replicas run, or after ``timeout`` s."""
        out = self.on_cluster(
            "import time\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    states = dict(serve.status().applications['lmrt'].deployments['LmrtReplica'].replica_states)\n"
            f"    if states.get('RUNNING', 0) >= {count} or time.monotonic() > deadline:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "print(states)\n",
            timeout=timeout + 60,
        )  # fmt: skip
        return eval(out.strip().splitlines()[-1])  # noqa: S307 - a dict printed by our own script

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        # `ray start --block` stops its cluster gracefully on SIGTERM, which takes half a minute;
        # this cluster holds nothing worth keeping, so its processes (the ones started here: their
        # command lines name this cluster's temp dir) are killed at once.
        os.killpg(self.head.pid, signal.SIGKILL)
        self.head.wait()
        for pid in cluster_pids(self.tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert self.proc is None or self.proc.returncode == 0, "".join(self.lines[-20:])
        shutil.rmtree(self.tmp, ignore_errors=True)


ADAPTER = "qv"


@pytest.fixture(scope="module")
def served_model(chat_model, tmp_path_factory):
    """The tiny chat Llama with one LoRA adapter added (random, on q and v), under its own name."""
    from lmrt.export import add_adapter

    root = tmp_path_factory.mktemp("ray-model")
    path = str(root / MODEL)
    shutil.copytree(chat_model, path)
    arch = runtime.LoadedModel(path).manifest.architecture
    sizes = {"q_proj": arch.num_heads * arch.head_size, "v_proj": arch.num_kv_heads * arch.head_size}
    add_adapter(path, random_peft(str(root / "peft"), arch, sizes, 4, 0), ADAPTER, progress=lambda _: None)
    return path


@pytest.fixture(scope="module")
def cluster(served_model):
    server = RayServer(served_model, replicas=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama(served_model):
    return runtime.Generator(served_model, provider="cpu")


def complete(client, max_tokens: int, stream: bool) -> tuple[str, str, str]:
    """(text, finish reason, replica) of one completion of PROMPT."""
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, stream=stream)
    replica = raw.headers["x-lmrt-replica"]
    out = raw.parse()
    if not stream:
        return out.choices[0].text, out.choices[0].finish_reason, replica
    chunks = [c for c in out if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    return "".join(c.choices[0].text for c in chunks), reasons[-1] if reasons else None, replica


def test_each_replica_exports_its_figures_to_ray_metrics(cluster):
    """First in this file, so the figures count exactly these requests: per replica (the
    x-lmrt-replica header), the requests it finished and the tokens it generated."""
    client = cluster.client()

    def ask(_):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=30, extra_body={"ignore_eos": True})
        return raw.headers["x-lmrt-replica"], raw.parse().usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(8)))
    served = collections.Counter(replica for replica, _ in answers)
    assert all(tokens == 30 for _, tokens in answers)
    expected = ({r: float(n) for r, n in served.items()}, {r: 30.0 * n for r, n in served.items()})
    deadline = time.monotonic() + 40
    while True:
        got = (cluster.ray_metric("ray_lmrt_requests_finished_total"), cluster.ray_metric("ray_llamacpp_tokens_predicted_total"))
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == expected
    assert set(cluster.ray_metric("ray_lmrt_kv_slots_total").values()) == {4.0}


@pytest.mark.parametrize("stream", [False, True])
def test_answers_equal_the_generator(cluster, llama, stream):
    client = cluster.client()
    text, reason, _ = complete(client, 20, stream)
    assert (text, reason) == (llama.generate(PROMPT, max_new_tokens=20), "length")
    expected = llama.chat(CHAT, max_new_tokens=12)
    if stream:
        chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, stream=True))
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        got = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12).choices[0].message.content
    assert got == expected


def test_requests_spread_over_both_replicas(cluster, llama):
    expected = llama.generate(PROMPT, max_new_tokens=40)
    client = cluster.client()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete(client, 40, i % 2 == 1), range(16)))
    assert all(text == expected for text, _, _ in answers)
    assert len({replica for _, _, replica in answers}) == 2


def test_every_replica_serves_the_directorys_adapters(cluster, llama):
    """The adapter of the model directory is a model of its own on every replica: listed with the
    base as its parent, and its answers, from either replica, are the Generator's with it."""
    client = cluster.client()
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {MODEL, ADAPTER} and listed[ADAPTER].model_extra.get("parent") == MODEL
    expected = llama.generate(PROMPT, adapter=ADAPTER, max_new_tokens=20)
    assert expected != llama.generate(PROMPT, max_new_tokens=20)

    def ask(_):
        raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=PROMPT, max_tokens=20)
        return raw.parse().choices[0].text, raw.headers["x-lmrt-replica"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(text == expected for text, _ in answers)
    assert len({replica for _, replica in answers}) == 2


def test_a_killed_replica_fails_its_requests_cleanly_and_comes_back(cluster, llama):
    expected = llama.generate(PROMPT, max_new_tokens=100)
    client = cluster.client()
    outcomes: list[tuple[float, str, object]] = []  # (time, replica or "", text or the exception)
    unclean: list[str] = []
    done = threading.Event()

    def load(i: int) -> None:
        while not done.is_set():
            try:
                text, reason, replica = complete(client, 100, stream=i % 2 == 0)
                outcomes.append((time.monotonic(), replica, (text, reason)))
            except openai.APIError as e:  # refused or broken off: a clean error, not a hang or a wrong answer
                outcomes.append((time.monotonic(), "", e))
            except Exception as e:  # noqa: BLE001 - anything else is not a clean failure
                unclean.append(repr(e))
                return

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def answered_by() -> set[str]:
        return {replica for _, replica, _ in outcomes if replica}

    wait_until(lambda: len(answered_by()) == 2 or unclean, 60, "answers from both replicas under load")
    assert not unclean, unclean
    victim = sorted(answered_by())[0]
    cluster.kill_replica(victim)
    killed_at = time.monotonic()
    # the load goes on until 3 s after the kill, and then until 8 more requests have ended
    wait_until(lambda: sum(at > killed_at + 3 for at, _, _ in outcomes) >= 8 or unclean, 90,
               "8 requests ended from 3 s after the kill")
    done.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not unclean, unclean
    answers = [o for _, _, o in outcomes if isinstance(o, tuple)]
    assert all(answer == (expected, "length") for answer in answers), "an answer was cut short or wrong"
    # failures only around the kill (requests in flight on, or just routed to, the killed replica);
    # from 3 s after it every request is answered, by the other replica
    late = [(replica, o) for at, replica, o in outcomes if at > killed_at + 3]
    assert late and all(isinstance(o, tuple) for _, o in late), [o for _, o in late if not isinstance(o, tuple)]
    assert all(replica != victim for replica, _ in late)

    states = cluster.wait_for_running(2, timeout=60)
    assert states.get("RUNNING") == 2, f"Ray did not bring the replica back: {states}"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete(client, 40, False), range(16)))
    assert all(text == llama.generate(PROMPT, max_new_tokens=40) for text, _, _ in answers)
    replicas = {replica for _, _, replica in answers}
    assert len(replicas) == 2 and victim not in replicas


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "2"], "error: --replicas needs --ray"),
        (["--ray", "--replicas", "2", "--min-replicas", "1"], "error: --replicas and --min-replicas/--max-replicas contradict"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "error: --max-replicas (2) is less than --min-replicas (3)"),
        (["--ray", "--replicas", "0"], "error: --replicas must be at least 1, got 0"),
        (["--ray", "--port", "0"], "error: --port 0 is not supported with --ray"),
        (["--ray", "--slots", "0"], "error: --slots must be at least 1, got 0"),
    ],
)
def test_bad_ray_options_are_one_line(chat_model, args, message):
    from click.testing import CliRunner

    from lmrt.cli import main

    result = CliRunner().invoke(main, ["serve", chat_model, *args])
    assert result.exit_code == 1 and result.output.startswith(message) and result.output.count("\n") == 1, result.output


def test_without_the_ray_extra_one_line_names_it(chat_model):
    """With ray not importable, --ray fails at once with one line naming the extra."""
    script = "import sys; sys.modules['ray'] = None; from lmrt.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", script, "serve", chat_model, "--ray"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: lmrt serve --ray needs the ray extra: pip install 'lmrt[ray]'")
    assert done.stderr.count("\n") == 1


# --- the autoscaling policy ------------------------------------------------------------------------


def policy_decision(busy: dict, waiting: dict, target: int, queued: float = 0, state: dict | None = None, now: float = 1000.0):
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from lmrt.serve.ray_deployment import slot_autoscaling_policy

    metrics = {"lmrt_slots": {r: 4.0 for r in busy}, "lmrt_busy_slots": busy, "lmrt_waiting": waiting} if busy else {}
    ctx = AutoscalingContext(
        deployment_id=DeploymentID(name="LmrtReplica", app_name="lmrt"), deployment_name="LmrtReplica", app_name="lmrt",
        current_num_replicas=target, target_num_replicas=target, running_replicas=list(busy), total_num_requests=0,
        total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=AutoscalingConfig(min_replicas=1, max_replicas=8, downscale_delay_s=60),
    )  # fmt: skip
    return slot_autoscaling_policy(ctx)


def test_the_policy_asks_for_a_slot_per_request():
    pytest.importorskip("ray.serve")
    # every slot busy and 5 requests waiting on 2 replicas of 4 slots: (8 + 5) / 4 -> 4 replicas
    assert policy_decision({"a": 4.0, "b": 4.0}, {"a": 3.0, "b": 2.0}, target=2)[0] == 4
    # requests queued in Ray's routers count too: (8 + 1) / 4 -> 3
    assert policy_decision({"a": 4.0, "b": 4.0}, {"a": 0.0, "b": 0.0}, target=2, queued=1)[0] == 3
    # every slot busy, nothing waiting: stay
    assert policy_decision({"a": 4.0, "b": 4.0}, {"a": 0.0, "b": 0.0}, target=2)[0] == 2
    # no replica has reported yet: stay
    assert policy_decision({}, {}, target=3)[0] == 3


def test_the_policy_scales_down_only_after_the_delay():
    pytest.importorskip("ray.serve")
    light = ({"a": 2.0, "b": 1.0}, {"a": 0.0, "b": 0.0})  # 3 requests fit in 1 replica
    target, state = policy_decision(*light, target=2, now=1000.0)
    assert target == 2
    target, state = policy_decision(*light, target=2, state=state, now=1059.0)
    assert target == 2
    target, state = policy_decision(*light, target=2, state=state, now=1061.0)
    assert target == 1
    # a busy spell in between starts the delay again
    _, state = policy_decision(*light, target=2, now=1000.0)
    _, state = policy_decision({"a": 4.0, "b": 4.0}, {"a": 1.0, "b": 0.0}, target=2, state=state, now=1030.0)
    assert policy_decision(*light, target=2, state=state, now=1061.0)[0] == 2
