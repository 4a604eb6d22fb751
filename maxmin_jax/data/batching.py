"""Tokenising preference pairs and prompts into left-padded, length-bucketed arrays; minibatch indices.

Left padding: generation appends new tokens on the right and the models count positions from the first real token,
so every sequence ends at the last column (see docs/CONTRACTS.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from maxmin_jax.data.schema import DataError, PreferenceRow, ValidatedRows, settle_problems

if TYPE_CHECKING:  # transformers is imported by whoever builds the tokenizer
    from transformers import PreTrainedTokenizerBase


def bucket_length(n: int, *, multiple: int = 16, minimum: int = 16) -> int:
    """Rounds a sequence length up to a multiple of ``multiple`` (and at least ``minimum``).

    A jitted function compiles once per input shape; padding lengths to a few buckets instead of the exact longest
    sequence bounds the number of recompilations across batches and datasets, for at most ``multiple - 1`` pads.
    """
    if multiple < 1 or minimum < 0:
        raise ValueError(f"need multiple >= 1 and minimum >= 0, got multiple={multiple}, minimum={minimum}")
    return max(minimum, math.ceil(n / multiple) * multiple)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Tokenised preference pairs; a pytree whose leaves are the arrays (user ids and groups are static metadata).

    Arrays are host numpy int32, ``[N, T]`` left padded with T bucketed; each sequence is prompt, response, EOS.
    ``user_index[i]`` indexes ``user_ids``; ``groups[u]`` is the true group of user u (evaluation only) or None.
    """

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    user_index: np.ndarray
    # Tuples rather than lists: pytree metadata must be hashable (jit caches on it).
    user_ids: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    groups: tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_pairs(self) -> int:
        return int(self.user_index.shape[0])

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def take(self, indices: np.ndarray) -> PairBatch:
        """The pairs at ``indices`` (e.g. one minibatch); user ids and groups are kept whole."""
        return dataclasses.replace(
            self,
            chosen_ids=self.chosen_ids[indices],
            chosen_mask=self.chosen_mask[indices],
            rejected_ids=self.rejected_ids[indices],
            rejected_mask=self.rejected_mask[indices],
            user_index=self.user_index[indices],
        )


def _left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=np.int32)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
    return ids, mask


def _padded_length(longest: int, max_length: int | None, multiple: int) -> int:
    length = bucket_length(longest, multiple=multiple)
    # Never pad past the model's limit: a bucket above max_length would need positions the model lacks.
    return min(length, max_length) if max_length is not None else length


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    return int(tokenizer.pad_token_id)


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens: how every sequence here is tokenised (and measured)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _encode_pairs(tokenizer, rows: Sequence[PreferenceRow], eos: int) -> dict[str, list[list[int]]]:
    """prompt + " " + response, then EOS, for both responses of every row."""
    return {field: [ids + [eos] for ids in encode(tokenizer, [f"{row.prompt} {getattr(row, field)}" for row in rows])]
            for field in ("chosen", "rejected")}


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token; sequences must end with EOS for the reward to read it")
    return int(tokenizer.eos_token_id)


def check_pair_lengths(
    rows: ValidatedRows, tokenizer: PreTrainedTokenizerBase, *, max_length: int, skip_invalid: bool = False
) -> ValidatedRows:
    """The rows whose sequences fit the model: prompt + response + EOS of at most ``max_length`` tokens (the
    model's positions), tokenised as ``tokenize_pairs`` does, so it will accept what this keeps.

    Run it after loading (and after any prompt template). A row too long is an error naming its file and row, or,
    with ``skip_invalid``, is skipped, logged and added to ``skipped`` like the loaders' invalid rows.
    """
    rows_list = list(rows.rows)
    if not rows_list:
        raise DataError(f"{rows.source}: no rows", source=rows.source)
    lengths = _encode_pairs(tokenizer, rows_list, _eos_id(tokenizer))
    kept: list[PreferenceRow] = []
    by_source: dict[str, tuple[list[tuple[int, str]], list[int]]] = {}  # source -> (problems, [total, kept])
    for i, row in enumerate(rows_list):
        source = row.source or rows.source
        problems, counts = by_source.setdefault(source, ([], [0, 0]))
        counts[0] += 1
        too_long = [(f, len(lengths[f][i])) for f in ("chosen", "rejected") if len(lengths[f][i]) > max_length]
        if too_long:
            field, n = too_long[0]
            problems.append((row.row if row.row is not None else i + 1,
                             f"field 'prompt' + '{field}': {n} tokens with EOS; expected at most max_length="
                             f"{max_length} (the model's positions)"))
        else:
            counts[1] += 1
            kept.append(row)
    skipped = list(rows.skipped)
    for source, (problems, (total, n_kept)) in by_source.items():
        settle_problems(problems, total=total, kept=n_kept, source=source, skip_invalid=skip_invalid)
        skipped.extend((n, reason if source == rows.source else f"{source}: {reason}") for n, reason in problems)
    return ValidatedRows(rows=kept, skipped=skipped, source=rows.source)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[PreferenceRow],
    *,
    max_length: int | None = None,
    multiple: int = 16,
) -> PairBatch:
    """Tokenises ``prompt + " " + response`` plus EOS for both responses of every row, left padded to one
    common bucketed length (chosen and rejected share T so they can be scored in one forward pass).

    Users are indexed in order of first appearance. ``groups`` is filled when every row has a group.

    Raises:
      DataError: a sequence longer than ``max_length`` (naming the row), a user with two groups, or rows where
        only some carry a group.
    """
    rows = list(rows)
    if not rows:
        raise DataError("tokenize_pairs: no rows")
    eos, pad = _eos_id(tokenizer), _pad_id(tokenizer)

    user_pos: dict[str, int] = {}
    user_group: dict[str, str | None] = {}
    for n, row in enumerate(rows, start=1):
        user_pos.setdefault(row.user_id, len(user_pos))
        known = user_group.setdefault(row.user_id, row.group)
        if known != row.group:
            raise DataError(f"row {n}: user {row.user_id!r} has group {row.group!r} here but {known!r} earlier")
    labelled = [g is not None for g in user_group.values()]
    if any(labelled) and not all(labelled):
        missing = next(u for u, g in user_group.items() if g is None)
        raise DataError(f"only some rows carry a group (user {missing!r} has none); expected all or none")

    chosen, rejected = _encode_pairs(tokenizer, rows, eos).values()
    if max_length is not None:
        for field, seqs in (("chosen", chosen), ("rejected", rejected)):
            for n, seq in enumerate(seqs, start=1):
                if len(seq) > max_length:
                    row = rows[n - 1]
                    where = f"{row.source}: row {row.row}" if row.source and row.row is not None else f"row {n}"
                    raise DataError(
                        f"{where} (user {row.user_id!r}): prompt + {field} is {len(seq)} tokens with EOS; "
                        f"expected at most max_length={max_length} (check_pair_lengths(..., skip_invalid=True) "
                        "skips such rows)", source=row.source, row=row.row if row.row is not None else n,
                        field="prompt")
    length = _padded_length(max(map(len, chosen + rejected)), max_length, multiple)
    chosen_ids, chosen_mask = _left_pad(chosen, length, pad)
    rejected_ids, rejected_mask = _left_pad(rejected, length, pad)
    return PairBatch(
        chosen_ids=chosen_ids,
        chosen_mask=chosen_mask,
        rejected_ids=rejected_ids,
        rejected_mask=rejected_mask,
        user_index=np.array([user_pos[row.user_id] for row in rows], dtype=np.int32),
        user_ids=tuple(user_pos),
        groups=tuple(user_group.values()) if all(labelled) else None,
    )


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_length: int | None = None,
    multiple: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises prompts (no EOS) into left-padded, bucketed ``(ids, mask)`` int32 ``[B, T]`` for generation."""
    if not prompts:
        raise DataError("tokenize_prompts: no prompts")
    seqs = encode(tokenizer, prompts)
    for n, seq in enumerate(seqs, start=1):
        if not seq:
            raise DataError(f"prompt {n}: tokenised to nothing; expected non-empty text")
        if max_length is not None and len(seq) > max_length:
            raise DataError(f"prompt {n}: {len(seq)} tokens; expected at most max_length={max_length}")
    return _left_pad(seqs, _padded_length(max(map(len, seqs)), max_length, multiple), _pad_id(tokenizer))


def minibatches(
    num_items: int, batch_size: int, rng: np.random.Generator | int | None = None
) -> Iterator[np.ndarray]:
    """Yields index arrays of exactly ``batch_size`` covering all ``num_items`` once per epoch.

    Shuffled when ``rng`` is given (a Generator or a seed), in order when None. Every batch has the same shape so a
    jitted step compiles once. Nothing is dropped: the last batch is filled by wrapping around to the start of the
    epoch's order, so ``ceil(num_items / batch_size)`` batches are yielded and a few items appear twice (they get
    slightly more weight in that epoch; with ``batch_size > num_items`` the order repeats within one batch).
    """
    if num_items < 1 or batch_size < 1:
        raise ValueError(f"need num_items >= 1 and batch_size >= 1, got {num_items}, {batch_size}")
    if rng is None:
        order = np.arange(num_items)
    else:
        order = np.random.default_rng(rng).permutation(num_items)
    num_batches = math.ceil(num_items / batch_size)
    wrapped = np.resize(order, num_batches * batch_size)  # np.resize repeats the array to fill
    for b in range(num_batches):
        yield wrapped[b * batch_size : (b + 1) * batch_size]
