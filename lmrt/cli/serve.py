"""``lmrt serve``: OpenAI's API over HTTP, in this process or as replicas on Ray Serve."""

from __future__ import annotations

import dataclasses
import os

import click

from ..serve.settings import ServeSettings
from .errors import CliError, errors_to_one_line
from .options import settings_options


@click.command("serve")
@click.argument("model_dir", type=click.Path())
@settings_options(ServeSettings)
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="Read the API key from the first line of this file.")
@click.option("--ray", "on_ray", is_flag=True, help="Serve replicas of the engine on Ray Serve (the ray extra); MODEL_DIR may be a file:// URI.")
@click.option("--address", help="With --ray: the Ray cluster to join (host:port, or auto) [default: start one on this machine].")
@click.option("--replicas", type=int, help="With --ray: a fixed number of replicas [default: 1].")
@click.option("--min-replicas", type=int, help="With --ray: autoscale on the engines' busy slots and queue, from this many replicas...")
@click.option("--max-replicas", type=int, help="...to this many.")
@errors_to_one_line
def serve(model_dir, api_key_file, on_ray, address, replicas, min_replicas, max_replicas, **options) -> None:
    """Serve the model in MODEL_DIR over HTTP with OpenAI's API.

    Routes: POST /v1/chat/completions, POST /v1/completions (or, for an embedding model, POST
    /v1/embeddings), GET /v1/models, GET /health, GET /metrics (Prometheus); with
    --allow-adapter-loading, POST /v1/load_lora_adapter and /v1/unload_lora_adapter. The state of
    all slots is reserved at start, and the ready line says how much: a KV cache of slots x ctx-size
    x (2 x layers x KV heads x head size x bytes per value), or a recurrent model's state per slot
    with its snapshots.

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

    if options["api_key"] and api_key_file:
        raise CliError("--api-key and --api-key-file contradict each other; give one")
    ray_only = {"--address": address, "--replicas": replicas, "--min-replicas": min_replicas, "--max-replicas": max_replicas}
    if not on_ray and any(v is not None for v in ray_only.values()):
        raise CliError(f"{next(k for k, v in ray_only.items() if v is not None)} needs --ray")
    try:
        if api_key_file:
            options["api_key"] = read_api_key(api_key_file)
        if on_ray:
            run_on_ray(model_dir, options, address, replicas, min_replicas, max_replicas)
        else:
            run_server(ServeSettings(model_dir=model_dir, **options), report)
    except ServeError as e:
        raise CliError(str(e)) from None


def run_on_ray(model_dir: str, options: dict, address, replicas, min_replicas, max_replicas) -> None:
    """``lmrt serve --ray``: the options checked (the replicas' first), then the replicas started."""
    from ..serve import ServeError

    if options.get("allow_adapter_loading"):
        raise ServeError("--allow-adapter-loading is not served on Ray: each replica would hold adapters of its own")
    try:
        from ..serve import ray_deployment as on_ray
    except ImportError as e:
        raise ServeError(f"lmrt serve --ray needs the ray extra: pip install 'lmrt[ray]' ({e})") from None
    on_ray.check_replicas(replicas, min_replicas, max_replicas, options["port"])
    path = on_ray.model_path(model_dir)
    settings = ServeSettings(model_dir=path, **options)
    if settings.manifest.task != "generate":
        raise ServeError(f"lmrt serve --ray serves generation models; {model_dir} is an {settings.manifest.task} model (serve it without --ray)")
    settings = dataclasses.replace(settings, model_dir=os.path.abspath(path))  # what every replica reads
    on_ray.serve_on_ray(settings, report, address, replicas, min_replicas, max_replicas)


def report(line: str) -> None:
    """How ``lmrt serve`` says where it listens: a line on stderr."""
    click.echo(line, err=True)
