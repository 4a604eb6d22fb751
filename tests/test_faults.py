"""Fault injection: each bad input or fault is named in one clear error (file, row, field), and nothing is lost
(skipped rows are counted, good checkpoint steps kept, previous outputs intact)."""

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmin_jax import GPT2Config, build_model, load_pretrained, save_pretrained
from maxmin_jax.checkpoint import (CheckpointManager, CheckpointMismatchError, TrainState,
                                   UnrestorableCheckpointError)
from maxmin_jax.data import (DataError, build_word_tokenizer, check_pair_lengths, load_preferences, read_prompts,
                             tokenize_pairs)
from maxmin_jax.errors import CheckpointError, ConfigError, InputError, NumericalFault
from maxmin_jax.guards import FLAG_PREFIX, GRAD_NORM_LIMIT, KL_LIMIT, LOSS_LIMIT, fault_flags, raise_on_fault
from maxmin_jax.strict_json import NonFiniteJSONError, dumps, write_json
from maxmin_jax.validate import check_optimizer, positive_int

GOOD = {"user_id": "u1", "prompt": "review : the movie", "chosen": "was great .", "rejected": "was dull ."}
WORDS = "review : the movie was great dull . a b c".split()


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# --- 1. data inputs -------------------------------------------------------------------------------------------

BAD_PROMPT_FILES = [  # name, content, expected message (after "<file>: ")
    ("list.jsonl", _jsonl({"prompt": "review :"}) + b"[1, 2]\n", r"line 2: expected a JSON object .*got a JSON array"),
    ("bytes.jsonl", _jsonl({"prompt": "review :"}) + b'{"prompt": "the \xff movie"}\n',
     r"line 2: not valid UTF-8 \(byte 0xff .*expected UTF-8 text"),
    ("bytes.txt", b"review :\nthe \xfe movie\n", r"line 2: not valid UTF-8 \(byte 0xfe"),
    ("broken.jsonl", _jsonl({"prompt": "review :"}) + b"\n" + b'{"prompt": "the movie"\n',
     r"line 3: malformed JSON \(.*\); expected one JSON object per line"),
    ("empty.jsonl", b"", r"the file is empty; expected one JSON object per line"),
    ("blank.txt", b"\n  \n", r"the file is empty; expected one prompt per line"),
    ("nofield.jsonl", _jsonl({"prompt": "review :"}, {"text": "review :"}),
     r"row 2: field 'prompt': expected a string, got nothing"),
]


@pytest.mark.parametrize("name, content, expected", BAD_PROMPT_FILES, ids=[c[0] for c in BAD_PROMPT_FILES])
def test_bad_prompt_file_is_named_with_its_line(tmp_path, name, content, expected):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=f"(?s)^{re.escape(str(path))}: .*{expected}") as err:
        read_prompts(path)
    assert isinstance(err.value, InputError) and err.value.source == str(path)
    named = re.search(r"(?:line|row) (\d+)", str(err.value))
    assert err.value.row == (int(named.group(1)) if named else None)  # the row attribute is the line named


BAD_PREFERENCE_FILES = [
    ("list.jsonl", _jsonl(GOOD) + b"[1, 2]\n", r"could not be read as jsonl: line 2: expected a JSON object"),
    ("bytes.jsonl", _jsonl(GOOD) + _jsonl(dict(GOOD, prompt="the \u00e9 movie")).replace(b"\\u00e9", b"\xe9"),
     r"line 2: not valid UTF-8 \(byte 0xe9"),
    ("broken.jsonl", _jsonl(GOOD, GOOD) + b'{"user_id": "u2", "prompt":\n', r"line 3: malformed JSON"),
    ("empty.jsonl", b"", r"the file is empty; expected one JSON object per line"),
    ("bytes.csv", b"user_id,prompt,chosen,rejected\nu1,review,was great,was dull\nu2,the \xff,a,b\n",
     r"line 3: not valid UTF-8"),
    ("ragged.csv", b"user_id,prompt,chosen,rejected\nu1,review,was great,was dull,extra\nu2,a,b,c,d\n",
     r"line 2: 5 cells; expected 4"),  # pandas would take the first column as an index and shift the rest
    ("header.csv", b"user_id,prompt,chosen,rejected\n", r"only a header row, no data rows"),
]


@pytest.mark.parametrize("name, content, expected", BAD_PREFERENCE_FILES, ids=[c[0] for c in BAD_PREFERENCE_FILES])
def test_bad_preference_file_is_named_with_its_line(tmp_path, name, content, expected):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=f"(?s)^{re.escape(str(path))}: .*{expected}") as err:
        load_preferences(path)
    assert err.value.source == str(path)


def test_rows_are_numbered_by_line_in_jsonl_with_blank_lines(tmp_path):
    path = _write(tmp_path / "p.jsonl", _jsonl(GOOD) + b"\n\n" + _jsonl(dict(GOOD, chosen="")))
    with pytest.raises(DataError, match=r"p\.jsonl: row 4: field 'chosen'") as err:
        load_preferences(path)
    assert (err.value.row, err.value.field) == (4, "chosen")


def test_prompt_longer_than_the_model_names_file_and_row_and_is_skipped_on_request(tmp_path, tok, caplog):
    path = _write(tmp_path / "prompts.txt", b"review :\nreview : the movie was great .\nthe movie\n")
    with pytest.raises(DataError, match=r"prompts\.txt: row 2: prompt: 7 tokens; expected 1 to max_length=4") as err:
        read_prompts(path, tokenizer=tok, max_length=4)
    assert err.value.row == 2
    with caplog.at_level(logging.WARNING):
        prompts = read_prompts(path, tokenizer=tok, max_length=4, skip_invalid=True)
    assert list(prompts) == ["review :", "the movie"] and prompts.rows == [1, 3]
    assert [n for n, _ in prompts.skipped] == [2] and "skipped 1 invalid prompts of 3" in caplog.text
    assert np.random.default_rng(0).choice(prompts, 4).shape == (4,)  # still usable as a list of prompts
    with pytest.raises(DataError, match="would leave none"):  # skipping everything is never a result
        read_prompts(path, tokenizer=tok, max_length=1, skip_invalid=True)


def test_the_pipeline_reads_prompts_strictly_by_row_unless_told_to_skip(tmp_path, tok):
    """The run's prompts (`prompts:` in a config) go through `read_prompts`: an empty or over-long prompt (after the
    template) is an error naming file and row and the config key that skips it; `max_prompts` reads only the first
    rows (a bad row after them is never read)."""
    from maxmin_jax.pipeline.config import PromptsConfig
    from maxmin_jax.pipeline.sources import load_prompt_ids

    lines = [{"prompt": "the movie"}, {"prompt": " "}, {"prompt": "review : the movie was great ."},
             {"prompt": "review :"}, {"prompt": 7}]
    path = _write(tmp_path / "prompts.jsonl", _jsonl(*lines))
    cfg = PromptsConfig(source=str(path), max_prompts=4)

    def template(text):
        return f"review : {text}"

    with pytest.raises(DataError) as err:
        load_prompt_ids(cfg, tok, limit=5, template=template)
    message = str(err.value)
    assert "2 of 4 prompts are invalid" in message and "row 2: field 'prompt': expected non-empty text" in message
    assert "row 3: field 'prompt': 9 tokens; expected 1 to max_length=5" in message
    assert "prompts.skip_invalid=True" in message and "row 5" not in message
    ids, skipped = load_prompt_ids(dataclasses.replace(cfg, skip_invalid=True), tok, limit=5, template=template)
    assert ids == [tok("review : the movie")["input_ids"], tok("review : review :")["input_ids"]] and skipped == 2
    cut = dataclasses.replace(cfg, max_tokens=2, max_prompts=3, skip_invalid=True)  # the cut comes before the template
    assert load_prompt_ids(cut, tok, limit=5, template=template) == (
        [tok("review : the movie")["input_ids"], tok("review : review :")["input_ids"]], 1)


def test_pair_too_long_for_the_model_names_file_and_row_and_is_skipped_on_request(tmp_path, tok, caplog):
    long = dict(GOOD, chosen="was great . a b c a b c")  # 4 + 9 tokens + EOS = 14
    path = _write(tmp_path / "prefs.jsonl", _jsonl(GOOD, dict(GOOD, chosen=None), long, GOOD))
    rows = load_preferences(path, skip_invalid=True)  # row 2 skipped: rows now have positions 1, 2, 3
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 3 \(user 'u1'\): prompt \+ chosen is 14 tokens"):
        tokenize_pairs(tok, rows.rows, max_length=12)  # names the file's row 3, not its position 2
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 3: field 'prompt' \+ 'chosen': 14 tokens with EOS"):
        check_pair_lengths(rows, tok, max_length=12)
    with caplog.at_level(logging.WARNING):
        fitted = check_pair_lengths(rows, tok, max_length=12, skip_invalid=True)
    assert [r.row for r in fitted.rows] == [1, 4] and [n for n, _ in fitted.skipped] == [2, 3]
    assert "skipped 1 invalid rows of 3" in caplog.text
    assert tokenize_pairs(tok, fitted.rows, max_length=12).num_pairs == 2
    assert fitted.rows == [rows.rows[0], rows.rows[2]] and fitted.source == str(path)


# --- 2. Hugging Face checkpoint loading -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 checkpoint. Built abstractly and filled with numpy: the faults below are in the files, so
    the values do not matter, and initialising a model eagerly costs seconds on a busy CPU."""
    abstract = nnx.eval_shape(lambda: build_model(GPT2Config.tiny(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), state)
    return save_pretrained(nnx.merge(graphdef, state), tmp_path_factory.mktemp("hf") / "good")


def _copy_checkpoint(hf_dir, tmp_path, name="ckpt"):
    return Path(shutil.copytree(hf_dir, tmp_path / name))


def test_garbage_safetensors_header(hf_dir, tmp_path):
    d = _copy_checkpoint(hf_dir, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[:8] = b"\xff" * 8
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file: .*header of "
                                              r"18446744073709551615 bytes, but the file has") as err:
        load_pretrained(d)
    assert err.value.path == str(d / "model.safetensors")
    (d / "model.safetensors").write_bytes(data[:8].replace(b"\xff" * 8, (20).to_bytes(8, "little")) + b"{not json" * 3)
    with pytest.raises(CheckpointError, match=r"the header is not JSON"):
        load_pretrained(d)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = _copy_checkpoint(hf_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor \S+ needs bytes \d+\.\.\d+ "
                                              r"of the data, but the file holds only \d+ bytes"):
        load_pretrained(d)


def test_malicious_pickle_is_refused_and_never_run(hf_dir, tmp_path):
    torch = pytest.importorskip("torch")
    d = _copy_checkpoint(hf_dir, tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, d / "pytorch_model.bin")
    pickled = (d / "pytorch_model.bin").read_bytes()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: the pickle holds more than tensors, "
                                              r"and code in a checkpoint is never run \(.*GLOBAL.*system"):
        load_pretrained(d)
    assert not marker.exists() and (d / "pytorch_model.bin").read_bytes() == pickled
    torch.save({"transformer.wte.weight": torch.zeros(64)}, d / "pytorch_model.bin")
    (d / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch checkpoint"):
        load_pretrained(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/model.safetensors", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_checkpoint_is_refused(hf_dir, tmp_path, shard):
    d = _copy_checkpoint(hf_dir, tmp_path)
    shutil.copy(d / "model.safetensors", tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"transformer.wte.weight": shard}}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map names '.*', which lies outside the "
                                              r"checkpoint directory .*; refusing to read it"):
        load_pretrained(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"weight_map names 'model-2\.safetensors', but .* does not exist"):
        load_pretrained(d)


def test_mistyped_local_path_is_not_a_hub_id(hf_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, **kw: calls.append(name) or (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.chdir(tmp_path)
    _copy_checkpoint(hf_dir, tmp_path / "runs" if (tmp_path / "runs").mkdir() is None else tmp_path, "gpt2-tiny")
    for typo, hint in [("runs/gpt2-tny", "; did you mean runs/gpt2-tiny?"), ("./gpt2-tiny", ""),
                       ("../nowhere/model", " (nor does ../nowhere)"), ("runs/a/b", " (nor does runs/a)")]:
        with pytest.raises(CheckpointError, match=f"^{typo}: not a checkpoint directory: it does not exist") as err:
            load_pretrained(typo)
        assert str(err.value).endswith(hint) and err.value.path == typo
    assert calls == []  # none of them went to the hub
    with pytest.raises(CheckpointError, match=r"^someorg/model: not a local directory, and the Hugging Face hub "
                                              r"could not provide it \(OSError: offline\)"):
        load_pretrained("someorg/model")
    assert calls == ["someorg/model"]
    assert load_pretrained("runs/gpt2-tiny").config == load_pretrained(hf_dir).config


# --- 3. Orbax checkpoints: a damaged latest step -------------------------------------------------------------

NUM_LEAVES = 96  # many arrays, so a failed restore has many reads in flight (the source of asyncio noise)


def _state(v: int) -> TrainState:
    params = {f"w{i:02d}": jnp.full((4, 4), float(v + i)) for i in range(NUM_LEAVES)}
    return TrainState(step=jnp.int32(v), params=params, opt_state={"count": jnp.int32(v)}, rng=jax.random.key(v))


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
    """Steps 2 and 3 kept of 1, 2, 3 (max_to_keep=2)."""
    directory = tmp_path_factory.mktemp("orbax") / "ckpt"
    with CheckpointManager(directory, fingerprint={"run": 1}, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step))
    return directory


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated array data": lambda step: _truncate(_largest_file(step / "state" / "d")),
    "corrupt manifest": lambda step: (step / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 64),
    "truncated meta": lambda step: _truncate(step / "meta" / "metadata"),
    "missing array data": lambda step: _largest_file(step / "state" / "d").unlink(),
}


def _same(a, b):
    for x, y in zip(jax.tree.leaves(jax.tree.map(_host, a)), jax.tree.leaves(jax.tree.map(_host, b))):
        np.testing.assert_array_equal(x, y)


def _host(x):
    is_key = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(x) if is_key else x)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_falls_back_and_loses_nothing(saved_steps, tmp_path, damage, caplog, monkeypatch):
    directory = Path(shutil.copytree(saved_steps, tmp_path / "ckpt"))
    DAMAGE[damage](directory / "3")
    step2, damaged3 = _files(directory / "2"), _files(directory / "3")
    noise = []
    monkeypatch.setattr(sys, "unraisablehook", noise.append)
    with caplog.at_level(logging.WARNING), CheckpointManager(directory, fingerprint={"run": 1}, max_to_keep=2) as ck:
        restored = ck.restore_latest(_state(0))
        _same(restored, _state(2))
        assert f"{directory} step 3 cannot be restored" in caplog.text and "step 2" in caplog.text
        assert list(ck.unrestorable) == [3] and ck.all_steps() == [2]
        # The damaged step is kept, byte for byte, out of the way; the good one is untouched.
        assert _files(directory / "unrestorable" / "3") == damaged3 and _files(directory / "2") == step2
        # Resuming saves step 3 afresh; the step resumed from survives until newer good steps replace it.
        ck.save(3, _state(30))
        ck.wait_until_finished()
        assert ck.all_steps() == [2, 3] and _files(directory / "2") == step2
        _same(ck.restore(3, _state(0)), _state(30))
        ck.save(4, _state(40))
        ck.wait_until_finished()
        assert ck.all_steps() == [3, 4] and (directory / "unrestorable" / "3").is_dir()
    time.sleep(0.3)  # reads of the failed restore that finish late would report now
    assert not [u for u in noise if "Event loop is closed" in str(u.exc_value)]


def test_no_restorable_step_is_one_clear_error_and_nothing_moves(saved_steps, tmp_path):
    directory = Path(shutil.copytree(saved_steps, tmp_path / "ckpt"))
    DAMAGE["corrupt manifest"](directory / "3")
    DAMAGE["truncated meta"](directory / "2")
    before = _files(directory)
    with CheckpointManager(directory, fingerprint={"run": 1}) as ckpt:
        with pytest.raises(UnrestorableCheckpointError, match=r"no checkpoint in .* can be restored:\n  step 3: "
                                                              r"ValueError: .*\n  step 2: .*JSONDecodeError") as err:
            ckpt.restore_latest(_state(0))
    assert sorted(err.value.failures) == [2, 3] and "Event loop" not in str(err.value)
    assert isinstance(err.value, InputError) and _files(directory) == before


def test_another_runs_checkpoint_is_refused_not_set_aside(saved_steps, tmp_path):
    directory = Path(shutil.copytree(saved_steps, tmp_path / "ckpt"))
    with pytest.raises(CheckpointMismatchError, match="run: checkpoint 1 != current 2"):
        CheckpointManager(directory, fingerprint={"run": 2}).restore_latest(_state(0))
    assert sorted(os.listdir(directory)) == ["2", "3"]


# --- 4. numerical-fault building blocks ----------------------------------------------------------------------

LIMITS = {"loss": LOSS_LIMIT, "grad_norm": GRAD_NORM_LIMIT, "kl": KL_LIMIT}


def test_fault_flags_in_jit_and_the_host_error():
    check = jax.jit(lambda m: {**m, **fault_flags(m, LIMITS)})
    healthy = check({"loss": 0.7, "grad_norm": 3.0, "kl": jnp.array([0.1, 0.2])})
    assert not any(bool(healthy[FLAG_PREFIX + k]) for k in LIMITS)
    raise_on_fault(jax.device_get(healthy), where="train-policy", step=7)  # nothing to report
    cases = [({"loss": jnp.nan}, "loss = nan at step 7 (not finite)"),
             ({"grad_norm": 1.9e10}, "grad_norm = 1.9e+10 at step 7 (|value| above the limit 1e+06)"),
             ({"kl": jnp.array([0.1, jnp.inf])}, "kl = inf at index (1,) at step 7 (not finite)")]
    for bad, expected in cases:
        metrics = jax.device_get(check({"loss": 0.7, "grad_norm": 3.0, "kl": jnp.array([0.1, 0.2]), **bad}))
        with pytest.raises(NumericalFault) as err:
            raise_on_fault(metrics, where="train-policy", step=7, last_good_step=6, limits=LIMITS)
        message = str(err.value)
        assert message.startswith(f"train-policy: {expected}; the run is stopped, the last good checkpoint is "
                                  "step 6; it is kept.")
        assert (err.value.quantity, err.value.step, err.value.last_good_step) == (expected.split()[0], 7, 6)
    with pytest.raises(NumericalFault, match="no checkpoint was written before it"):
        raise_on_fault({"loss": 0.5, FLAG_PREFIX + "loss": 0.25}, where="EM M-step")  # averaged over minibatches
    with pytest.raises(KeyError, match="no metric"):
        fault_flags({"loss": 1.0}, {"kl": None})


def test_strict_json_never_writes_nan_and_keeps_the_old_file(tmp_path):
    report = {"history": [{"loss": 0.5}, {"loss": np.float32("nan")}], "weights": np.array([0.5, 0.5])}
    with pytest.raises(NonFiniteJSONError, match=r"^\$\.history\[1\]\.loss = nan: JSON outputs hold finite numbers"):
        dumps(report)
    assert json.loads(dumps(report, nonfinite="null"))["history"][1]["loss"] is None
    path = write_json(tmp_path / "em_history.json", {"weights": np.array([0.25, 0.75]), "round": np.int64(3)})
    before = path.read_bytes()
    assert json.loads(before) == {"weights": [0.25, 0.75], "round": 3}
    with pytest.raises(NonFiniteJSONError):
        write_json(path, report)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["em_history.json"]  # no half file, no temp
    with pytest.raises(TypeError, match=r"\$\.model: a object cannot be written"):
        dumps({"model": object()})


def test_optimizer_settings_are_validated():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Opt:
        learning_rate: float = 1e-4
        weight_decay: float = 0.0
        max_grad_norm: float | None = 1.0
        steps: int = 10

        def __post_init__(self):
            check_optimizer(self)
            positive_int(self, "steps")

    Opt(max_grad_norm=None)
    lr = "Opt.learning_rate: expected a finite number > 0, got"
    for kwargs, message in [({"learning_rate": float("nan")}, f"{lr} nan"),
                            ({"learning_rate": -1.0}, f"{lr} -1.0"),
                            ({"learning_rate": float("inf")}, f"{lr} inf"),
                            ({"weight_decay": -0.1}, "Opt.weight_decay: expected a finite number >= 0"),
                            ({"max_grad_norm": 0.0}, "Opt.max_grad_norm: expected a finite number > 0 or None"),
                            ({"steps": True}, "Opt.steps: expected an integer >= 1, got True (a bool)"),
                            ({"steps": -3}, "Opt.steps: expected an integer >= 1, got -3")]:
        with pytest.raises(ConfigError) as err:
            Opt(**kwargs)
        assert str(err.value).startswith(message) and err.value.key == next(iter(kwargs))
