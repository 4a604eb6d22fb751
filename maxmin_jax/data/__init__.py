"""Preference data: rows and validation, loaders, synthetic worlds with ground truth, tokenising and batching."""

from maxmin_jax.data.batching import (PairBatch, bucket_length, check_pair_lengths, minibatches, tokenize_pairs,
                                     tokenize_prompts)
from maxmin_jax.data.loaders import load_grouped, load_preferences, load_psoups
from maxmin_jax.data.prompts import ValidatedPrompts, read_prompts
from maxmin_jax.data.schema import DataError, PreferenceRow, ValidatedRows, validate_rows
from maxmin_jax.data.synthetic import PlantedWorld, ReviewWorld, planted_world, rewards_from_token_table
from maxmin_jax.data.tokenizer import build_word_tokenizer

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
