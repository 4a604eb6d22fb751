"""Shared fixtures. Eight simulated CPU devices so sharding tests really shard; tiny checkpoints built with
transformers' save_pretrained once per session.

JAX's persistent compilation cache is off: with it, writing one executable (`executable.serialize()`, jax 0.10.2,
the sharded LoRA critic-free step after the rest of its worker's tests) crashed the xdist worker with a segfault,
twice in full runs, never alone. `MAXMIN_TEST_JIT_CACHE=1` turns it back on (one directory per session, shared by
the workers and the subprocesses tests start, removed at the end).
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Tests compile hundreds of small programs and run each a few times: XLA's backend optimisations cost more compile
# time than they save at run time (the suite takes about half as long without them), and so do XLA:CPU's MLIR
# fusion emitters (its older elemental emitters compile the same programs in about half the time:
# tests/test_trainer.py 19 -> 10 s of CPU). Subprocesses of tests compile with the same flags (`xla_flags`).
_OLD_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA knows `flag`: it aborts the process on an unknown one, and the emitters' flag may
    go with the old emitters. Asked once, by the first process (the others inherit XLA_FLAGS with the flag)."""
    if flag.split("=")[0] in os.environ.get("XLA_FLAGS", ""):
        return True
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"})
    return probe.returncode == 0


COMPILE_FLAGS = ("--xla_backend_optimization_level=0",) + ((_OLD_EMITTERS,) if _xla_accepts(_OLD_EMITTERS) else ())


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's subprocess: `devices` simulated CPU devices, compiled as the tests compile."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *COMPILE_FLAGS))


_FLAGS = os.environ.get("XLA_FLAGS", "")  # a flag set explicitly wins
for _flag in xla_flags(8).split():
    if _flag.split("=")[0] not in _FLAGS:
        _FLAGS = f"{_FLAGS} {_flag}".strip()
os.environ["XLA_FLAGS"] = _FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set by the first process of the session (the xdist controller, loading this file before it starts the workers),
# inherited by the workers and the subprocesses, removed by that process at the end.
_OWN_CACHE = os.environ.get("MAXMIN_TEST_JIT_CACHE") == "1" and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    _CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                   os.path.join(tempfile.gettempdir(), f"maxmin-jax-test-jit-{os.getpid()}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


# The files that take longest (half a minute or more each in a full run), longest first. `make test` runs each file
# on one of two workers (`--dist loadfile`), handing out files in collection order, so the suite's wall time is the
# busier worker's sum: starting the longest files first leaves the short ones to even the two workers out at the end
# (xdist's default hands out the files with the most tests first, which left long end-to-end files with few tests
# for last). A file missing here only runs later; keep the list roughly in step with `--durations`.
LONGEST_FIRST = ("test_em_zoo.py", "test_experiment.py", "test_pipeline.py", "test_em.py", "test_sharding.py",
                 "test_benchmarks_smoke.py", "test_em_auto.py", "test_faults_runs.py", "test_checkpoint.py",
                 "test_pipeline_pretrained.py", "test_cli.py", "test_lora.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _save_tiny(path, hf_config_cls, model_cls, **kwargs):
    import torch

    torch.manual_seed(0)
    model = model_cls(hf_config_cls(**kwargs)).eval()
    model.save_pretrained(path)
    return path


def save_word_gpt2(path, tokenizer):
    """A one-layer GPT-2 HF checkpoint sized to a word tokenizer, saved with it, as a user would have it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=64,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save_tiny(tmp_path_factory.mktemp("gpt2"), GPT2Config, GPT2LMHeadModel, n_layer=2, n_embd=32, n_head=4,
                      vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=1)


def llama_dir(tmp_path_factory, *, num_kv_heads: int, tie: bool, name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_tiny(tmp_path_factory.mktemp(name), LlamaConfig, LlamaForCausalLM, num_hidden_layers=2,
                      hidden_size=32, num_attention_heads=4, num_key_value_heads=num_kv_heads, intermediate_size=64,
                      vocab_size=100, max_position_embeddings=64, tie_word_embeddings=tie, rope_theta=500.0)


@pytest.fixture(scope="session")
def tiny_llama_dirs(tmp_path_factory):
    """MHA / GQA / MQA, untied and tied heads."""
    return {
        "mha": llama_dir(tmp_path_factory, num_kv_heads=4, tie=False, name="llama_mha"),
        "gqa": llama_dir(tmp_path_factory, num_kv_heads=2, tie=False, name="llama_gqa"),
        "mqa": llama_dir(tmp_path_factory, num_kv_heads=1, tie=False, name="llama_mqa"),
        "gqa_tied": llama_dir(tmp_path_factory, num_kv_heads=2, tie=True, name="llama_tied"),
    }


def left_padded_prompts(vocab_size: int, batch: int = 8, length: int = 6, seed: int = 0):
    """Random prompt ids [batch, length] with every other row left-padded by two (pad id 0, tokens from 3 up)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, :2] = 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def read_tfevents(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files, read with tensorboardX's protobufs (TFRecord framing by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# Zoo worlds for the EM tests (test_em_zoo.py, test_em_auto.py) ---------------------------------------------------
@pytest.fixture(scope="module")
def zoo_worlds():
    """zoo("test"): per index, (world, rows, tokenized pairs, oracle ARI)."""
    from maxmin_jax.data import tokenize_pairs
    from maxmin_jax.data.zoo import zoo

    out = {}
    for i, world in enumerate(zoo("test")):
        rows = world.preference_rows()
        out[i] = (world, rows, tokenize_pairs(world.tokenizer(), rows, max_length=64), world.oracle_ari(rows))
    return out


@pytest.fixture(scope="module")
def cli_world(zoo_worlds):
    """The zoo world the command-line and bad-input tests use: test polarity #2 (2 groups, 24 users)."""
    return zoo_worlds[2]


@pytest.fixture(scope="module")
def zoo_reward_config(zoo_worlds):
    """One reward-model config for every zoo world (one word vocabulary): a one-layer GPT-2, hidden 32."""
    from maxmin_jax.models import GPT2Config

    return GPT2Config(vocab_size=len(zoo_worlds[0][0].tokenizer()), max_position_embeddings=64, hidden_size=32,
                      num_layers=1, num_heads=4)


def fit_zoo(batch, model_config, config, heads=None):
    """`fit_em` of a fresh reward model with `heads` (default: config.num_groups) heads."""
    from flax import nnx

    from maxmin_jax.rewards import RewardModel, fit_em

    model = RewardModel.from_config(model_config, heads or config.num_groups, nnx.Rngs(config.seed))
    return fit_em(model, batch, config)
