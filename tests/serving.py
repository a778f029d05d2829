"""A real ``lmrt serve`` process for the server tests, and a bounded wait on its state."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time

import openai
import pytest

from conftest import wait_for_serve_url

# Two functions the tool-calling tests offer: one with an enum and a bounded string, one with
# bounded integers.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]  # fmt: skip


class Server:
    """A ``lmrt serve`` subprocess on a free port of 127.0.0.1."""

    def __init__(self, model_dir: str, *args: str, timeout: float = 120):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmrt", "serve", model_dir, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        base = wait_for_serve_url(self.proc, self.lines, timeout)
        if base is None or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the server did not start: " + "".join(self.lines))
        self.base = base
        self.host, self.port = self.base[len("http://") :].rsplit(":", 1)

    def client(self, api_key: str = "none", **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
        """(status, the JSON answer or the text) of one request."""
        status, _headers, answer = self.request(method, path, body, headers)
        return status, answer

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict | str]:
        """(status, headers in lower case, the JSON answer or the text) of one request."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read().decode("utf-8")
        conn.close()
        try:
            answer = json.loads(data)
        except json.JSONDecodeError:
            answer = data
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer

    def metric(self, name: str, headers: dict | None = None) -> float:
        status, text = self.raw("GET", "/metrics", headers=headers)
        assert status == 200
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(condition, what: str, polls: int = 400, every: float = 0.05) -> None:
    """Poll ``condition`` (a server's state, which sends no event) at most ``polls`` times; fail
    naming ``what`` was awaited if it never holds."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(every)
    pytest.fail(f"waited {polls * every:.0f} s for {what}")


def complete_at_once(client, model: str, jobs: list) -> list:
    """The text of each ``(prompt, settings, stream)`` completion job, every job sent at the same time
    on a thread of its own (None for one that did not finish within two minutes)."""
    results: list = [None] * len(jobs)

    def run(i):
        prompt, settings, stream = jobs[i]
        if stream:
            chunks = client.completions.create(model=model, prompt=prompt, stream=True, **settings)
            results[i] = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            results[i] = client.completions.create(model=model, prompt=prompt, **settings).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results
