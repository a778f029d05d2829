"""The model's tokenizer, read from the model directory's tokenizer file by the tokenizers library."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import first_line
from .model_dir import MANIFEST_FILE, ManifestError
from .paths import contained_path

if TYPE_CHECKING:
    from .manifest import Manifest


def load_tokenizer(model_dir: str, manifest: Manifest):
    """The model's ``tokenizers.Tokenizer``, or ManifestError naming the file when it cannot be read."""
    from tokenizers import Tokenizer

    path = contained_path(model_dir, manifest.tokenizer.file, f"tokenizer.file in {MANIFEST_FILE}")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
        raise ManifestError(
            f"{path} is not a tokenizer the tokenizers library can read ({first_line(e)}); export the model again"
        ) from None
