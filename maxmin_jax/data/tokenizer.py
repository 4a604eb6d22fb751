"""A word-level tokenizer for closed-vocabulary synthetic worlds, built with the `tokenizers` library.

One token per word keeps synthetic rewards exact on token ids (a per-token lookup table) and keeps tiny models
tiny. It is a real ``transformers`` fast tokenizer, so it goes through ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` exactly like a hub tokenizer does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, pre_tokenizers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2: pad = 0 matches generate()'s default pad_token_id


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Builds a WordLevel tokenizer: "<pad>"=0, "<eos>"=1, "<unk>"=2, then ``words`` in first-seen order.

    Text is split by the Whitespace pre-tokenizer (``\\w+|[^\\w\\s]+``), so "." is its own word when the vocabulary
    holds it. Unknown words map to "<unk>". Padding is on the left, as generation with a KV cache expects.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, got {word!r}")
        vocab.setdefault(word, len(vocab))
    from transformers import PreTrainedTokenizerFast  # on use: importing transformers costs ~0.5 s

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
    )


def load_tokenizer(name_or_path: str, *, vocab_size: int | None = None):
    """`AutoTokenizer` (hub id or directory) set up as generation with a KV cache needs: left padding, and a pad
    token (EOS when it has none, as GPT-2, or when its pad id lies outside the model's `vocab_size` embeddings;
    pads are masked, so any id in range works). A tokenizer without EOS is refused: responses must end with one."""
    from transformers import AutoTokenizer

    from maxmin_jax.data.schema import DataError

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{name_or_path}: the tokenizer has no EOS token; responses must end with one")
    if tokenizer.pad_token is None or (vocab_size is not None and tokenizer.pad_token_id >= vocab_size):
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
