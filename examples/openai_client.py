"""Talk to `lmrt serve` with the official openai client: a streamed chat with history, several
samples at once, and log-probabilities.

    lmrt serve models/smollm2-135m-instruct-int8 --slots 4 &
    python examples/openai_client.py --url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the server serves one model

    # A conversation: each turn sends the whole history; the server reuses what it cached of it.
    messages = [{"role": "system", "content": "Answer in one short sentence."}]
    for question in ["What is the capital of France?", "And of Italy?"]:
        messages.append({"role": "user", "content": question})
        answer = ""
        print(f"> {question}")
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=64, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices:
                answer += chunk.choices[0].delta.content or ""
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            elif chunk.usage:  # the last chunk: token counts, and how much of the prompt was cached
                cached = chunk.usage.prompt_tokens_details.cached_tokens
                print(f"\n[{chunk.usage.prompt_tokens} prompt tokens, {cached} from the cache, "
                      f"{chunk.usage.completion_tokens} generated]")
        messages.append({"role": "assistant", "content": answer})

    # Three samples of one prompt in one request.
    out = client.completions.create(model=model, prompt="Once upon a time", n=3, max_tokens=24,
                                    temperature=0.9, top_p=0.95, seed=1)
    for choice in out.choices:
        print(f"[sample {choice.index}] {choice.text!r}")

    # The model's log-probability of each token it chose, and the runner-up.
    out = client.chat.completions.create(model=model, messages=messages[:2], max_tokens=8, logprobs=True, top_logprobs=2)
    for item in out.choices[0].logprobs.content:
        alternatives = ", ".join(f"{t.token!r} {t.logprob:.2f}" for t in item.top_logprobs)
        print(f"{item.token!r:>12} {item.logprob:6.2f}   ({alternatives})")


if __name__ == "__main__":
    main()
