"""``lmrt serve``: OpenAI's API over HTTP, in this process or as replicas on Ray Serve."""

from __future__ import annotations

import os

import click

from .errors import CliError, errors_to_one_line
from .options import runtime_options


@click.command("serve")
@click.argument("model_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, type=int, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--slots", default=4, type=int, show_default=True, help="Requests generated at once: rows of the KV cache.")
@click.option("--ctx-size", type=int, help="Tokens per slot, prompt and output together [default: 2048, or the model's context if smaller].")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="Read the API key from the first line of this file.")
@click.option("--max-queue", default=64, type=int, show_default=True, help="Requests that may wait for a slot; more are refused with 503.")
@click.option("--prefill-chunk", default=256, type=int, show_default=True, help="Prompt tokens read per step while other slots decode.")
@click.option("--model-name", help="The model id clients send [default: the directory's name].")
@runtime_options
@click.option("--ray", "on_ray", is_flag=True, help="Serve replicas of the engine on Ray Serve (the ray extra); MODEL_DIR may be a file:// URI.")
@click.option("--address", help="With --ray: the Ray cluster to join (host:port, or auto) [default: start one on this machine].")
@click.option("--replicas", type=int, help="With --ray: a fixed number of replicas [default: 1].")
@click.option("--min-replicas", type=int, help="With --ray: autoscale on the engines' busy slots and queue, from this many replicas...")
@click.option("--max-replicas", type=int, help="...to this many.")
@errors_to_one_line
def serve(model_dir, host, port, slots, ctx_size, api_key, api_key_file, max_queue, prefill_chunk, model_name, provider,
          threads, on_ray, address, replicas, min_replicas, max_replicas) -> None:  # fmt: skip
    """Serve the model in MODEL_DIR over HTTP with OpenAI's API.

    Routes: POST /v1/chat/completions, POST /v1/completions (or, for an embedding model, POST
    /v1/embeddings), GET /v1/models, GET /health, GET /metrics (Prometheus). The KV cache for all
    slots is reserved at start: slots x ctx-size x (2 x layers x KV heads x head size x bytes per
    value).

    \b
    Examples:
      lmrt serve models/smollm2 --slots 8
      lmrt serve models/smollm2 --port 8080 --ctx-size 4096 --api-key-file key.txt
      lmrt serve models/smollm2 --ray --replicas 2 --threads 1
      lmrt serve file:///shared/smollm2 --ray --address auto --min-replicas 1 --max-replicas 8
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from ..serve import ServeError, read_api_key
    from ..serve import serve as run_server

    if api_key and api_key_file:
        raise CliError("--api-key and --api-key-file contradict each other; give one")
    ray_only = {"--address": address, "--replicas": replicas, "--min-replicas": min_replicas, "--max-replicas": max_replicas}
    if not on_ray and any(v is not None for v in ray_only.values()):
        raise CliError(f"{next(k for k, v in ray_only.items() if v is not None)} needs --ray")
    try:
        if api_key_file:
            api_key = read_api_key(api_key_file)
        if on_ray:
            serve_on_ray(model_dir, host, port, slots, ctx_size, api_key, max_queue, prefill_chunk, model_name, provider,
                          threads, address, replicas, min_replicas, max_replicas)  # fmt: skip
            return
        run_server(
            model_dir, lambda line: click.echo(line, err=True), host=host, port=port, slots=slots, ctx_size=ctx_size,
            api_key=api_key, provider=provider, threads=threads, max_queue=max_queue, prefill_chunk=prefill_chunk,
            model_name=model_name,
        )  # fmt: skip
    except ServeError as e:
        raise CliError(str(e)) from None


def serve_on_ray(model_dir, host, port, slots, ctx_size, api_key, max_queue, prefill_chunk, model_name, provider, threads,
                  address, replicas, min_replicas, max_replicas) -> None:  # fmt: skip
    from ..serve import ServeError, check_settings, default_model_name

    try:
        from ..serve import ray_deployment as on_ray
    except ImportError as e:
        raise ServeError(f"lmrt serve --ray needs the ray extra: pip install 'lmrt[ray]' ({e})") from None
    on_ray.check_replicas(replicas, min_replicas, max_replicas, port)
    path = on_ray.model_path(model_dir)
    manifest, ctx_size = check_settings(path, slots, ctx_size, max_queue, prefill_chunk, api_key)
    if manifest.task != "generate":
        raise ServeError(f"lmrt serve --ray serves generation models; {model_dir} is an {manifest.task} model (serve it without --ray)")
    settings = on_ray.ReplicaSettings(
        os.path.abspath(path), model_name or default_model_name(path), slots, ctx_size, max_queue, prefill_chunk, provider,
        threads, api_key,
    )  # fmt: skip
    on_ray.serve_on_ray(settings, lambda line: click.echo(line, err=True), host, port, address, replicas, min_replicas, max_replicas)

