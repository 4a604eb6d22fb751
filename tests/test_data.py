"""Preference loading, validation, tokenizer and batching."""

from __future__ import annotations

import csv
import json
import logging

import datasets
import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from maxmin_jax.data import (
    DataError,
    PairBatch,
    PreferenceRow,
    bucket_length,
    build_word_tokenizer,
    load_grouped,
    load_preferences,
    load_psoups,
    minibatches,
    tokenize_pairs,
    tokenize_prompts,
    validate_rows,
)

GOOD = {"user_id": "u1", "prompt": "review : the movie", "chosen": "was great .", "rejected": "was dull ."}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records, fields=("user_id", "prompt", "chosen", "rejected")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    return path


def rows_of(n, **overrides):
    return [dict(GOOD, user_id=f"u{i % 3}", **overrides) for i in range(n)]


# --- validation: every bad input names file, row, field and what was expected ---------------------------------

BAD_ROWS = [
    ({k: v for k, v in GOOD.items() if k != "chosen"}, "'chosen'", "expected a string"),
    (dict(GOOD, rejected="   "), "'rejected'", "expected non-empty text"),
    (dict(GOOD, prompt=None), "'prompt'", "expected a string"),
    (dict(GOOD, user_id=7), "'user_id'", "coerce_user_id=True"),
    (dict(GOOD, user_id=""), "'user_id'", "expected a non-empty string"),
    (dict(GOOD, rejected=GOOD["chosen"]), "'chosen' and 'rejected'", "expected two different responses"),
    (dict(GOOD, group=3), "'group'", "expected a non-empty string or null"),
]


@pytest.mark.parametrize("bad, field, expected", BAD_ROWS)
def test_bad_row_error_names_file_row_field(bad, field, expected):
    records = [GOOD, bad, GOOD]
    with pytest.raises(DataError) as err:
        validate_rows(records, source="prefs.jsonl")
    message = str(err.value)
    assert "prefs.jsonl: row 2: field" in message and field in message and expected in message
    assert "1 of 3 rows are invalid" in message and "skip_invalid=True" in message


def test_bad_row_in_jsonl_file(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, dict(GOOD, chosen="")])
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 3: field 'chosen': expected non-empty text"):
        load_preferences(path)


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    records = rows_of(6)
    records[1] = dict(records[1], chosen=None)
    records[4] = dict(records[4], rejected=records[4]["chosen"])
    path = write_jsonl(tmp_path / "prefs.jsonl", records)
    with caplog.at_level(logging.WARNING):
        result = load_preferences(path, skip_invalid=True)
    assert len(result) == 4 and [n for n, _ in result.skipped] == [2, 5]
    assert "chosen" in result.skipped[0][1]
    assert "skipped 2 invalid rows of 6" in caplog.text and "prefs.jsonl" in caplog.text
    with pytest.raises(DataError, match="2 of 6 rows are invalid"):
        load_preferences(path)


def test_strict_error_lists_first_problems_and_count():
    records = [dict(GOOD, chosen="") for _ in range(9)]
    message = str(pytest.raises(DataError, validate_rows, records, source="x.csv").value)
    assert "9 of 9 rows" in message and "row 5:" in message and "row 6:" not in message and "4 more" in message


def test_jsonl_roundtrip_and_coerce_user_id(tmp_path):
    records = [dict(GOOD, user_id=7, group="a"), dict(GOOD, user_id=8, group="b")]
    path = write_jsonl(tmp_path / "ints.jsonl", records)
    with pytest.raises(DataError, match="row 1: field 'user_id': expected a string, got int 7"):
        load_preferences(path)
    result = load_preferences(path, coerce_user_id=True)
    assert result.rows == [PreferenceRow("7", GOOD["prompt"], GOOD["chosen"], GOOD["rejected"], "a"),
                           PreferenceRow("8", GOOD["prompt"], GOOD["chosen"], GOOD["rejected"], "b")]


def test_csv_numeric_ids_and_empty_cell(tmp_path):
    path = write_csv(tmp_path / "prefs.csv", [dict(GOOD, user_id=1), dict(GOOD, user_id=2, rejected="")])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert "prefs.csv: row 1: field 'user_id'" in message and "coerce_user_id" in message
    with pytest.raises(DataError, match=r"prefs\.csv: row 2: field 'rejected': expected a string, got nothing"):
        load_preferences(path, coerce_user_id=True)
    result = load_preferences(path, coerce_user_id=True, skip_invalid=True)
    assert [r.user_id for r in result] == ["1"] and result.skipped[0][0] == 2


def test_parquet_column_mapping_and_missing_column(tmp_path):
    path = tmp_path / "prefs.parquet"
    renamed = [{"annotator": r["user_id"], "question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
               for r in rows_of(4)]
    datasets.Dataset.from_list(renamed).to_parquet(str(path))
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert "prefs.parquet" in message and "'user_id'" in message and "annotator" in message and "columns=" in message
    mapping = {"user_id": "annotator", "prompt": "question", "chosen": "good", "rejected": "bad"}
    result = load_preferences(path, columns=mapping)
    assert len(result) == 4 and result.rows[1].user_id == "u1" and result.rows[0].chosen == GOOD["chosen"]
    with pytest.raises(DataError, match="unknown fields"):
        load_preferences(path, columns={"answer": "good"})


def test_unknown_extension_missing_file_and_bad_json(tmp_path):
    txt = tmp_path / "prefs.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match=r"prefs\.txt: unsupported file extension '\.txt'.*\.jsonl"):
        load_preferences(txt)
    with pytest.raises(DataError, match="no such file"):
        load_preferences(tmp_path / "absent.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"user_id": "u", "prompt": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: could not be read as jsonl"):
        load_preferences(broken)


def test_hub_id_goes_to_load_dataset_unchanged(monkeypatch):
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(rows_of(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_preferences("someorg/prefs", split="test")
    assert calls == [("someorg/prefs", {"split": "test"})] and len(result) == 3
    assert result.source == "someorg/prefs[test]"


def test_prompt_longer_than_model_allows():
    records = [GOOD, dict(GOOD, prompt="one two three four five")]
    count = lambda text: len(text.split())  # noqa: E731
    with pytest.raises(DataError, match="row 2: field 'prompt': expected at most 4 tokens .*got 5"):
        validate_rows(records, source="p.jsonl", max_prompt_tokens=4, count_tokens=count)
    result = validate_rows(records, source="p.jsonl", max_prompt_tokens=4, count_tokens=count, skip_invalid=True)
    assert len(result) == 1 and result.skipped[0][0] == 2


def test_load_psoups_round_robin_users(tmp_path):
    def psoups(name, n):
        recs = [{"user_input": f"q{i}", "completion_a": f"good {i}", "completion_b": f"bad {i}"} for i in range(n)]
        return write_jsonl(tmp_path / f"{name}.jsonl", recs)

    result = load_psoups({"P1A": psoups("P1A", 5), "P1B": psoups("P1B", 4)}, users_per_group=2)
    assert len(result) == 9
    first = result.rows[:5]
    assert [r.user_id for r in first] == ["P1A-0", "P1A-1", "P1A-0", "P1A-1", "P1A-0"]
    assert all(r.group == "P1A" for r in first) and first[3].chosen == "good 3" and first[3].rejected == "bad 3"
    assert {r.user_id for r in result.rows[5:]} == {"P1B-0", "P1B-1"}


def test_load_psoups_skips_keep_round_robin(tmp_path):
    recs = [{"user_input": f"q{i}", "completion_a": f"a{i}", "completion_b": f"b{i}"} for i in range(4)]
    recs[1]["completion_b"] = recs[1]["completion_a"]
    path = write_jsonl(tmp_path / "p.jsonl", recs)
    result = load_psoups({"g": path}, users_per_group=2, skip_invalid=True)
    assert [r.user_id for r in result] == ["g-0", "g-0", "g-1"]
    assert result.skipped[0][0] == 2 and "p.jsonl" in result.skipped[0][1]


def test_load_grouped_sources_and_user_collision():
    a = datasets.Dataset.from_list([dict(GOOD, user_id="x"), dict(GOOD, user_id="y")])
    b = [dict(GOOD, user_id="z")]
    result = load_grouped({"A": a, "B": b})
    assert [(r.user_id, r.group) for r in result] == [("x", "A"), ("y", "A"), ("z", "B")]
    with pytest.raises(DataError, match="user 'x' also appears in group 'A'"):
        load_grouped({"A": a, "B": [dict(GOOD, user_id="x")]})


# --- tokenizer ------------------------------------------------------------------------------------------------

def test_word_tokenizer_save_load_round_trip(tmp_path):
    tok = build_word_tokenizer(["the", "movie", "was", "great", ".", "the"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and tok.padding_side == "left"
    ids = tok("the movie was great. weird", add_special_tokens=False)["input_ids"]
    assert ids == [3, 4, 5, 6, 7, 2]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("the movie was great. weird", add_special_tokens=False)["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 1, "left")
    assert loaded.decode([3, 4, 1, 0], skip_special_tokens=True) == "the movie"
    with pytest.raises(ValueError, match="whitespace"):
        build_word_tokenizer(["two words"])


# --- batching -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, kwargs, expected", [(1, {}, 16), (16, {}, 16), (17, {}, 32), (0, {}, 16),
                                                 (9, {"multiple": 8, "minimum": 0}, 16), (3, {"minimum": 64}, 64)])
def test_bucket_length(n, kwargs, expected):
    assert bucket_length(n, **kwargs) == expected


@pytest.fixture
def tok():
    return build_word_tokenizer("review : the movie was great dull and very long . a b c d e f g".split())


def test_tokenize_pairs_left_padded_and_bucketed(tok):
    rows = [PreferenceRow("u1", "review : the movie", "was great .", "was dull .", "g1"),
            PreferenceRow("u2", "review :", "was very great and long . a b c d e f g", "was dull .", "g2"),
            PreferenceRow("u1", "review : the movie", "was dull .", "was great and great .", "g1")]
    batch = tokenize_pairs(tok, rows)
    assert batch.chosen_ids.shape == batch.rejected_ids.shape == (3, 16)
    assert batch.chosen_ids.dtype == np.int32 and batch.user_index.dtype == np.int32
    assert batch.user_ids == ("u1", "u2") and list(batch.user_index) == [0, 1, 0] and batch.groups == ("g1", "g2")
    for ids, mask, row, field in [(batch.chosen_ids, batch.chosen_mask, r, "chosen") for r in rows] + [
            (batch.rejected_ids, batch.rejected_mask, r, "rejected") for r in rows]:
        i = rows.index(row)
        expected = tok(f"{row.prompt} {getattr(row, field)}", add_special_tokens=False)["input_ids"] + [1]
        n = len(expected)
        assert list(mask[i]) == [0] * (16 - n) + [1] * n  # pads on the left, one real block on the right
        assert list(ids[i, 16 - n:]) == expected and (ids[i, : 16 - n] == 0).all()


def test_tokenize_pairs_max_length_and_groups(tok):
    long_row = PreferenceRow("u9", "review :", "a b c d e f g a b c", "was dull .")
    with pytest.raises(DataError, match=r"row 2 \(user 'u9'\): prompt \+ chosen is 13 tokens.*max_length=12"):
        tokenize_pairs(tok, [PreferenceRow("u1", "review :", "a", "b"), long_row], max_length=12)
    batch = tokenize_pairs(tok, [long_row], max_length=13)
    assert batch.chosen_ids.shape == (1, 13) and batch.groups is None  # capped at the model limit, not 16
    with pytest.raises(DataError, match="only some rows carry a group"):
        tokenize_pairs(tok, [PreferenceRow("u1", "a", "b", "c", "g"), PreferenceRow("u2", "a", "b", "c")])
    with pytest.raises(DataError, match="row 2: user 'u1' has group 'h'"):
        tokenize_pairs(tok, [PreferenceRow("u1", "a", "b", "c", "g"), PreferenceRow("u1", "a", "b", "c", "h")])


def test_pair_batch_is_a_pytree_and_takes_minibatches(tok):
    rows = [PreferenceRow(f"u{i % 2}", "review :", "was great .", "was dull .") for i in range(5)]
    batch = tokenize_pairs(tok, rows)
    total = jax.jit(lambda b: b.chosen_mask.sum() + b.user_index.sum())(batch)
    assert int(total) == 5 * 6 + 2  # 5 tokens + EOS per sequence
    assert len(jax.tree_util.tree_leaves(batch)) == 5
    sub = batch.take(np.array([4, 1]))
    assert isinstance(sub, PairBatch) and sub.num_pairs == 2 and list(sub.user_index) == [0, 1]
    assert sub.user_ids == batch.user_ids


def test_tokenize_prompts(tok):
    ids, mask = tokenize_prompts(tok, ["review : the movie", "review :"])
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32
    assert list(mask[1, -3:]) == [0, 1, 1] and list(ids[0, -4:]) == [3, 4, 5, 6] and ids[0, -5] == 0
    with pytest.raises(DataError, match="prompt 2: 2 tokens"):
        tokenize_prompts(tok, ["review", "review :"], max_length=1)


def test_minibatches_cover_everything_without_dropping():
    batches = list(minibatches(10, 4, rng=0))
    assert len(batches) == 3 and all(b.shape == (4,) for b in batches)
    seen = np.concatenate(batches)
    assert set(seen) == set(range(10)) and list(seen[10:]) == list(seen[:2])  # wrapped, not dropped
    assert [list(b) for b in minibatches(10, 4, rng=0)] == [list(b) for b in batches]
    assert [list(b) for b in minibatches(3, 2)] == [[0, 1], [2, 0]]
    assert list(next(minibatches(2, 5))) == [0, 1, 0, 1, 0]
