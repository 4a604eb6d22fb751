"""The benchmark suites' code paths on tiny shapes (`--quick`): the JSON schema, the cost model, the timing helpers.

No timing thresholds: these runs share the machine with the rest of the test suite. The two suite runs take
about half a minute each on two cores, almost all of it XLA compiling the tiny programs (model init, forward,
generate, train steps).
"""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder, not part of the installed package

from benchmarks import run  # noqa: E402
from benchmarks.costs import model_cost  # noqa: E402
from benchmarks.registry import BENCHMARKS  # noqa: E402
from benchmarks.timing import Timing, measure_interleaved, quartiles  # noqa: E402

for _module in run.BENCHMARK_MODULES:  # what `run.main` imports: registers every benchmark
    importlib.import_module(_module)

VERSION_KEYS = {"jax", "jaxlib", "flax", "torch", "transformers"}


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_timing(t):
    assert set(t) >= {"median_s", "q1_s", "q3_s", "iqr_s", "min_s", "repeats", "warmup", "samples_s", "cpu_median_s"}
    assert t["repeats"] == len(t["samples_s"]) >= 1
    assert t["min_s"] <= t["q1_s"] <= t["median_s"] <= t["q3_s"]


def _check_document(doc, suite, names):
    assert doc["schema_version"] == 1 and doc["suite"] == suite and doc["quick"] is True
    assert doc["errors"] == [], doc["errors"]
    assert "benchmarks.run" in doc["command"] and "--quick" in doc["command"]
    hw = doc["hardware"]
    assert hw["cpu_model"] and hw["cpu_count"] >= 1 and hw["devices"] and isinstance(hw["gpus"], list)
    assert hw["load_average_at_start"] is not None and hw["load_average_at_end"] is not None
    assert VERSION_KEYS <= set(doc["versions"]) and all(doc["versions"][k] for k in VERSION_KEYS)
    assert doc["date"] and isinstance(doc["threads"]["torch_intra_op"], int)
    assert set(doc["ceilings"]) == set(run.SUITE_CEILINGS[suite])
    for c in doc["ceilings"].values():
        assert _finite_positive(c["value"]) and c["unit"] and c["description"]
        assert c["value"] == max(c["methods"].values()) and len(c["pass_values"]) == 2  # start and end
        for t in c["timings"].values():
            _check_timing(t)
    assert [b["name"] for b in doc["benchmarks"]] == names
    for b in doc["benchmarks"]:
        assert b["description"] and b["config"] and b["figures"]
        for f in b["figures"]:
            assert set(f) == {"name", "value", "unit", "ceiling", "ceiling_source", "fraction_of_ceiling", "timing"}
            assert _finite_positive(f["value"]) and f["unit"]
            if f["ceiling"] is not None:
                assert _finite_positive(f["ceiling"]) and f["ceiling_source"]
                assert f["fraction_of_ceiling"] == pytest.approx(f["value"] / f["ceiling"])
            if f["timing"] is not None:
                _check_timing(f["timing"])
        for r in b["ratios"]:
            assert _finite_positive(r["value"]) and r["round_q1"] <= r["round_q3"]
            assert (r["target"] is None) == (r["meets_target"] is None) and _finite_positive(r["cpu_time_value"])


def _run_suite(tmp_path, suite, capsys, only=()):
    out = tmp_path / f"{suite}.json"
    status = run.main(["--suite", suite, "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out),
                       "--only", ",".join(only)])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert status == 0, doc["errors"]
    for b in doc["benchmarks"]:
        assert b["name"] in printed
    return doc


def _suite_names(suite):
    return [name for name, b in BENCHMARKS.items() if suite in b.suites]


def test_cpu_suite_quick(tmp_path, capsys):
    doc = _run_suite(tmp_path, "cpu", capsys)
    names = _suite_names("cpu")
    assert {"forward_gpt2", "forward_llama_small", "sample_gpt2_greedy", "sample_gpt2_temperature"} <= set(names)
    _check_document(doc, "cpu", names)
    by_name = {b["name"]: b for b in doc["benchmarks"]}
    for name in ("forward_gpt2", "forward_llama_small"):
        # Same weights on both sides: the comparison is between two implementations of one function.
        assert by_name[name]["extra"]["logit_rel_err_vs_hf"] < 1e-4
        assert [r["target"] for r in by_name[name]["ratios"]] == [1.3 if name == "forward_gpt2" else None]
    for name in ("sample_gpt2_greedy", "sample_gpt2_temperature"):
        assert by_name[name]["ratios"][0]["target"] == 1.5
        assert by_name[name]["config"]["hf_generate"]["min_new_tokens"] == by_name[name]["config"]["new_tokens"]
    # Same weights in float32, greedy: every generated token equals transformers' (a near-tie flipping one would be
    # a parity bug worth seeing).
    assert by_name["sample_gpt2_greedy"]["extra"]["greedy_token_agreement_vs_hf"] == 1.0
    memory = by_name["critic_free_iteration"]["extra"]["memory_mib"]  # PPO and GRPO compiled, memory read
    assert set(memory) == {"PPO", "GRPO"} and all(m["total"] > 0 for m in memory.values())
    assert [r["name"] for r in by_name["critic_free_iteration"]["ratios"]][0].startswith("GRPO vs PPO")
    assert by_name["dpo_step"]["extra"]["memory_mib"]["total"] > 0


def test_gpu_suite_quick_runs_on_cpu(tmp_path, capsys):
    names = _suite_names("gpu")[::-1]  # every benchmark, named with --only in another order than registered
    assert {"train_gpt2_medium", "train_llama7b_lora", "decode_llama7b", "ppo_iteration_gpt2_medium",
            "grpo_iteration_gpt2_medium"} <= set(names)
    doc = _run_suite(tmp_path, "gpu", capsys, only=names)
    _check_document(doc, "gpu", names)
    by_name = {b["name"]: b for b in doc["benchmarks"]}
    for name in ("train_gpt2_medium", "train_llama7b_lora"):
        extra = by_name[name]["extra"]
        assert 0 < extra["mfu"] and math.isfinite(extra["final_loss"])
        assert by_name[name]["config"]["attention"] == "xla"  # what the CPU backend selects (cuDNN on a GPU)
    assert by_name["train_gpt2_medium"]["config"]["param_dtype"] == "float32"  # the mixed-precision policy
    lora = by_name["train_llama7b_lora"]
    assert lora["extra"]["lora_params"] > 0 or any("full-weight" in n for n in lora["notes"])
    assert by_name["decode_llama7b"]["extra"]["bytes_per_step_required"] > 0
    for name in ("ppo_iteration_gpt2_medium", "grpo_iteration_gpt2_medium"):
        iteration = by_name[name]
        assert iteration["config"]["dtype"] == "bfloat16"
        assert iteration["extra"]["iteration_s"] > iteration["extra"]["rollout_s"] > 0
    assert by_name["grpo_iteration_gpt2_medium"]["config"]["batch"] == by_name["ppo_iteration_gpt2_medium"]["config"][
        "batch"] and by_name["grpo_iteration_gpt2_medium"]["config"]["samples_per_prompt"] == 2


def test_gpu_full_size_lora_step_traces_abstractly():
    """The 7B LoRA step at the GPU suite's shapes, traced without allocating (the quick run covers the wiring)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks.gpu import DTYPE, LLAMA7B_LORA_TRAIN, make_train_step
    from maxmin_jax.models import LlamaConfig, build_model
    from maxmin_jax.models.lora import add_lora

    shape = LLAMA7B_LORA_TRAIN
    model = nnx.eval_shape(lambda: build_model(LlamaConfig.llama2_7b(), rngs=nnx.Rngs(0), dtype=DTYPE))
    add_lora(model, rank=shape["lora_rank"], rngs=nnx.Rngs(1))
    tx = optax.adamw(1e-5)
    step, params, frozen = make_train_step(model, nnx.LoRAParam, tx)
    ids = jax.ShapeDtypeStruct((shape["batch"], shape["seq"] + 1), jnp.int32)
    lowered = step.lower(params, jax.eval_shape(tx.init, params), frozen, ids)
    assert lowered.out_info[2].shape == ()  # the loss
    assert model_cost(model).lora_params == 32 * 2 * (4096 * 16 + 16 * 4096)  # q and v, every layer


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmarks"):
        run.main(["--suite", "cpu", "--only", "forward_gpt2,no_such_benchmark", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="unknown benchmarks"):  # a GPU benchmark is not in the CPU suite
        run.main(["--suite", "cpu", "--only", "decode_llama7b", "--out", str(tmp_path / "x.json")])


def test_entry_point_lists_suite():
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "gpu", "--list", "--out", "unused"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    for name in _suite_names("gpu"):
        assert name in out


def test_cost_model_counts_known_sizes():
    import jax.numpy as jnp
    from flax import nnx

    from maxmin_jax.models import GPT2Config, LlamaConfig, build_model

    gpt2 = model_cost(nnx.eval_shape(lambda: build_model(GPT2Config.gpt2(), rngs=nnx.Rngs(0))))
    assert gpt2.params_total == 124_439_808  # GPT-2 small, as published
    # Block matrices (qkv, attn_out, fc, proj; not biases or norms) + the tied head.
    assert gpt2.params_matmul == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert gpt2.weight_bytes == 4 * (124_439_808 - 1024 * 768)  # all but the gathered position table
    llama = model_cost(nnx.eval_shape(lambda: build_model(LlamaConfig.llama2_7b(), rngs=nnx.Rngs(0),
                                                          dtype=jnp.bfloat16)))
    assert llama.params_total == 6_738_415_616 and llama.itemsize == 2  # Llama-2-7B
    assert llama.train_flops(1, 8, lora=False) == pytest.approx(3 * llama.forward_flops(1, 8))
    assert llama.kv_bytes(2, 10) == 2 * 2 * 32 * 32 * 128 * 10 * 2


def test_profile_reports_ops():
    import jax
    import jax.numpy as jnp

    from benchmarks.profile import op_times

    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((8, 8))
    total, count = op_times(lambda: f(x))
    assert total and set(total) == set(count) and all(ns >= 0 for ns in total.values())


def test_timing_helpers():
    calls = []
    timings = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                                  warmup=1)
    assert calls == ["a", "b"] * 4 and set(timings) == {"a", "b"}
    assert all(isinstance(t, Timing) and t.repeats == 3 for t in timings.values())
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0) and quartiles([7.0]) == (7.0, 7.0)


def test_em_init_zoo_summary_counts_the_k_chosen_only_with_auto():
    from benchmarks.em_init_zoo import summary

    rows = [{"split": "independent", "oracle": o, "ari": a, "k": k, "K": 3, "seconds": 1.0}
            for o, a, k in ((1.0, 1.0, 3), (1.0, 0.5, 2), (0.9, 0.2, 3))]
    text = summary(rows, auto=True)
    assert "K chosen right in 2/3 worlds, 1/2 with oracle >= 0.95" in text
    assert "oracle >= 0.95: mean 0.750, >= 0.9 in 1/2" in text
    assert "K chosen" not in summary(rows)


def test_outside_worlds_are_the_ones_measured():
    """docs/em.md's tables of the outside worlds are reproducible: each world's rows are a function of its number,
    and its oracle is the one listed there (two worlds of each set here; the fits themselves are benchmarks/
    work)."""
    from benchmarks import outside_worlds, unseen_worlds

    for worlds, number, oracle, users in ((outside_worlds, 2, 1.0, 48), (outside_worlds, 7, 1.0, 40),
                                          (unseen_worlds, 2, 1.0, 56), (unseen_worlds, 4, 1.0, 55)):
        rows, truth, meta = worlds.build(number)
        assert worlds.build(number)[0] == rows
        assert meta["oracle_ari"] == oracle and len(truth) == users
        assert {r["user_id"] for r in rows} == set(truth)
