"""lmrt's runtime: load an exported model directory and generate text, or embed and classify texts.

Imports only numpy, onnxruntime and tokenizers (jinja2 for chat templates), never torch,
transformers or onnx.

    from lmrt import runtime
    gen = runtime.Generator("models/smollm2")
    for piece in gen.stream("The capital of France is", max_new_tokens=16):
        print(piece, end="", flush=True)

    enc = runtime.Encoder("models/minilm")
    vectors = enc.embed(["A cat sits on the mat.", "Ein Hund spielt im Garten."])
"""

from .chat import ChatTemplateError, render_chat
from .config import ConfigError, GenerationConfig
from .encoder import Encoder, Label
from .engine import Engine, EngineStatus
from .engine_settings import EngineSettings
from .generator import Completion, Generator, TextStream
from .manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest
from .model import LoadedModel
from .request import Event, TokenLogprob
from .scoring import Score
from .scheduler import QueueFullError
from .session import ProviderError, available_providers

__all__ = [
    "ChatTemplateError",
    "Completion",
    "ConfigError",
    "Encoder",
    "Engine",
    "EngineSettings",
    "EngineStatus",
    "Event",
    "GenerationConfig",
    "Generator",
    "Label",
    "LoadedModel",
    "MANIFEST_FILE",
    "Manifest",
    "ManifestError",
    "ProviderError",
    "QueueFullError",
    "Score",
    "TextStream",
    "TokenLogprob",
    "available_providers",
    "load_manifest",
    "render_chat",
]
