"""Preference data: rows and validation, loaders, synthetic worlds with ground truth, tokenising and batching."""

import importlib
from typing import TYPE_CHECKING

# Imported on first use (PEP 562): the loaders pull in `datasets`, so a command that reads no table skips it.
_EXPORTS = {
    **dict.fromkeys(("PairBatch", "bucket_length", "check_pair_lengths", "minibatches", "tokenize_pairs",
                     "tokenize_prompts"), "maxmin_jax.data.batching"),
    **dict.fromkeys(("load_grouped", "load_preferences", "load_psoups"), "maxmin_jax.data.loaders"),
    **dict.fromkeys(("ValidatedPrompts", "read_prompts"), "maxmin_jax.data.prompts"),
    **dict.fromkeys(("DataError", "PreferenceRow", "ValidatedRows", "validate_rows"), "maxmin_jax.data.schema"),
    **dict.fromkeys(("PlantedWorld", "ReviewWorld", "planted_world", "rewards_from_token_table"),
                    "maxmin_jax.data.synthetic"),
    "build_word_tokenizer": "maxmin_jax.data.tokenizer",
}

if TYPE_CHECKING:
    from maxmin_jax.data.batching import (PairBatch, bucket_length, check_pair_lengths, minibatches, tokenize_pairs,
                                         tokenize_prompts)
    from maxmin_jax.data.loaders import load_grouped, load_preferences, load_psoups
    from maxmin_jax.data.prompts import ValidatedPrompts, read_prompts
    from maxmin_jax.data.schema import DataError, PreferenceRow, ValidatedRows, validate_rows
    from maxmin_jax.data.synthetic import PlantedWorld, ReviewWorld, planted_world, rewards_from_token_table
    from maxmin_jax.data.tokenizer import build_word_tokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maxmin_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "DataError",
    "PairBatch",
    "PlantedWorld",
    "PreferenceRow",
    "ReviewWorld",
    "ValidatedPrompts",
    "ValidatedRows",
    "bucket_length",
    "build_word_tokenizer",
    "check_pair_lengths",
    "load_grouped",
    "load_preferences",
    "load_psoups",
    "minibatches",
    "planted_world",
    "read_prompts",
    "rewards_from_token_table",
    "tokenize_pairs",
    "tokenize_prompts",
    "validate_rows",
]
