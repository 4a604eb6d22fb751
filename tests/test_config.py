"""One config system: strict YAML reading (unknown keys, wrong types and missing keys named by their key path; a bool
is never a number), tagged sources, sections layered over the demo defaults, `--print-config`, the shipped
configs, and the demo's defaults equal to configs/demo.yaml (so a clone and an installed wheel run the same demo)."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from maxmin_jax.cli import main
from maxmin_jax.config_io import ConfigError, dump_yaml, from_dict, to_dict
from maxmin_jax.generate import SamplingConfig
from maxmin_jax.pipeline import (FilePreferences, FitRewards, PretrainedModel, RunConfig, ScratchModel,
                                 WorldPreferences, load_config)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PACKAGE = Path(__file__).resolve().parent.parent / "maxmin_jax"


def load(tmp_path, text: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(path)


def test_demo_defaults_are_configs_demo_yaml_and_need_no_file(tmp_path):
    assert load_config(CONFIGS / "demo.yaml") == RunConfig()
    # As installed from a wheel: the package alone, no configs/ beside it, run from elsewhere.
    shutil.copytree(PACKAGE, tmp_path / "site" / "maxmin_jax", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", "from maxmin_jax.cli import main; main(['demo', '--print-config'])"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert from_dict(RunConfig, yaml.safe_load(out)) == load_config(CONFIGS / "demo.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "gpt2_imdb.yaml", "tulu2_7b_psoups.yaml"])
def test_shipped_configs_parse_and_print_round_trip(name):
    cfg = load_config(CONFIGS / name)
    assert from_dict(RunConfig, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_shipped_pretrained_configs_say_what_they_are():
    imdb, tulu = load_config(CONFIGS / "gpt2_imdb.yaml"), load_config(CONFIGS / "tulu2_7b_psoups.yaml")
    assert isinstance(imdb.model, PretrainedModel) and imdb.model.policy == "gpt2"
    assert isinstance(imdb.preferences, FilePreferences) and imdb.prompts.max_tokens == 8
    assert tulu.preferences.source == "psoups" and tulu.lora.policy.rank == 16 and tulu.mesh.fsdp == 8


@pytest.mark.parametrize("text, message", [
    ("policy:\n  ppo:\n    learning_rat: 0.1\n", r"run.yaml:policy.ppo.learning_rat: unknown key"),
    ("policy:\n  iterations: ten\n", r"run.yaml:policy.iterations: expected int, got 'ten'"),
    ("policy:\n  iterations: true\n", r"policy.iterations: expected int, got True \(bool\)"),
    ("policy:\n  ppo: {adaptive_kl: 1}\n", r"policy.ppo.adaptive_kl: expected bool, got 1 \(int\)"),
    ("rewards:\n  em: {learning_rate: 0.1}\n", r"rewards.em.learning_rate: unknown key"),
    ("rewards:\n  em: {method: medium}\n", r"rewards.em.method: expected one of 'hard', 'soft', got 'medium'"),
    ("rewards:\n  em: {length_shape: maybe}\n",
     r"rewards.em.length_shape: expected one of 'auto', 'on', 'off', got 'maybe'"),
    ("rewards:\n  em: {feature_disputed_tokens: [32, 0]}\n",
     r"rewards.em.feature_disputed_tokens: expected a list of integers >= 1, got \(32, 0\)"),
    ("rewards:\n  em: {feature_flip_rate: 0.7}\n",
     r"rewards.em.feature_flip_rate: expected 'auto' or a number in \[0, 0.5\), got 0.7"),
    ("preferences: {source: database}\n", r"preferences.source: expected one of 'world', 'files', 'psoups'"),
    ("preferences: {source: files}\n", r"preferences.files: required key missing"),
    ("model: {source: pretrained}\n", r"model.policy: required key missing"),
    ("preferences:\n  world: {name: review, num_user: 3}\n", r"preferences.world.num_user: unknown key"),
    ("preferences:\n  world: {name: mars}\n", r"preferences.world.name: unknown world 'mars'"),
    ("sampling: {top_p: 0}\n", r"run.yaml:sampling.top_p: expected a number in \(0, 1\] or None, got 0.0"),
    ("sampling: {top_k: 0}\n", r"run.yaml:sampling.top_k: expected an integer >= 1 or None, got 0"),
    ("policy: {objectives: [maxmin, fairest]}\n", r"run.yaml:policy.objectives: unknown \['fairest'\]; expected "
                                                  r"names from single, utilitarian"),
    ("policy: {objectives: maxmin}\n", r"policy.objectives: expected a list of str, got 'maxmin'"),
    ("seed: 1\nseed_: 2\n", r"run.yaml:seed_: unknown key"),
    ("- 1\n- 2\n", r"expected a mapping of config keys"),
    ("policy: {iterations: [1\n", r"not valid YAML"),
])
def test_config_errors_name_the_key_path(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_every_choice_of_the_em_config_is_checked():
    """EMConfig checks each field typed as a Literal of strings against that Literal: a field added so is checked."""
    from maxmin_jax.rewards.em import EMConfig, _choices

    assert {"method", "init", "assign_by", "disputed_bigrams", "prompt_features", "length_shape", "response_ends",
            "token_positions", "repetition", "prompt_topics"} == set(_choices())
    for name, allowed in _choices().items():
        assert getattr(EMConfig(num_groups=2), name) in allowed
        with pytest.raises(ConfigError, match=rf"EMConfig.{name}: expected one of {', '.join(map(repr, allowed))}, "
                                              "got 'x'"):
            EMConfig(num_groups=2, **{name: "x"})


def test_sections_state_only_what_differs_from_the_defaults(tmp_path):
    cfg = load(tmp_path, "rewards:\n  em: {rounds: 7}\npolicy:\n  ppo: {epochs: 3}\nsampling: {top_p: 0.9}\n")
    default = RunConfig()
    assert cfg.rewards.em == dataclasses.replace(default.rewards.em, rounds=7)  # K=2 and the lr stay the demo's
    assert cfg.policy.ppo == dataclasses.replace(default.policy.ppo, epochs=3)
    assert cfg.sampling == dataclasses.replace(default.sampling, top_p=0.9)
    # A world option given alone keeps the other options of the default world.
    cfg = load(tmp_path, "preferences:\n  world: {num_users: 22}\n")
    assert cfg.preferences.world.options == {**default.preferences.world.options, "num_users": 22}
    # Switching the tag starts from the new kind's own defaults.
    cfg = load(tmp_path, "preferences: {source: files, files: prefs.jsonl}\nmodel: {source: pretrained, policy: gpt2}"
                         "\nprompts: {source: prompts.txt}\n")
    assert cfg.preferences == FilePreferences(files="prefs.jsonl") and cfg.model == PretrainedModel(policy="gpt2")


def test_numbers_as_yaml_writes_them(tmp_path):
    cfg = load(tmp_path, "policy:\n  ppo: {learning_rate: 1e-5, init_kl_coef: 0}\n")  # YAML 1.1: "1e-5" is a str
    assert cfg.policy.ppo.learning_rate == 1e-5 and cfg.policy.ppo.init_kl_coef == 0.0
    assert isinstance(cfg.policy.ppo.init_kl_coef, float)


def test_on_and_off_are_words_not_booleans(tmp_path):
    """YAML 1.2's booleans (true / false only) in files, overrides and flags: settings whose values are "auto",
    "on", "off" take the bare words, and a boolean setting refuses them by name."""
    from maxmin_jax.cli import build_parser, config_flags

    cfg = load(tmp_path, "rewards:\n  em: {length_shape: off, prompt_features: on}\n")
    assert (cfg.rewards.em.length_shape, cfg.rewards.em.prompt_features) == ("off", "on")
    cfg = load_config(None, overrides=["rewards.em.length_shape=off"])
    assert cfg.rewards.em.length_shape == "off"
    args = build_parser().parse_args(["fit-rewards", "--data", "x", "--model", "y", "--out", "z", "--num-groups", "2",
                                      "--prompt-features", "off", "--length-shape", "on"])
    assert {k: v for k, v in config_flags(args, "em").items() if k in ("prompt_features", "length_shape")} == {
        "prompt_features": "off", "length_shape": "on"}
    with pytest.raises(ConfigError, match=r"policy.ppo.adaptive_kl: expected bool, got 'yes' \(str\)"):
        load(tmp_path, "policy:\n  ppo: {adaptive_kl: yes}\n")
    assert load(tmp_path, "policy:\n  ppo: {adaptive_kl: false}\n").policy.ppo.adaptive_kl is False


def test_cross_section_rules_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="model.source: 'scratch' trains a GPT-2 on the world's texts"):
        load(tmp_path, "preferences: {source: files, files: x.jsonl}\n")
    with pytest.raises(ConfigError, match="policy.prompt_batch: 64 is not divisible by mesh data \\* fsdp = 3"):
        load(tmp_path, "mesh: {data: 3}\n")
    with pytest.raises(ConfigError, match="sampling.temperature: expected > 0"):
        load(tmp_path, "sampling: {temperature: 0}\n")


def test_overrides_are_typed_like_the_file(tmp_path):
    cfg = load_config(None, overrides=["policy.iterations=3", "policy.objectives=[maxmin]", "lora.policy.rank=4"])
    assert cfg.policy.iterations == 3 and cfg.policy.objectives == ("maxmin",) and cfg.lora.policy.rank == 4
    with pytest.raises(ConfigError, match="policy.iterations: expected int, got 2.5"):
        load_config(None, overrides=["policy.iterations=2.5"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(None, overrides=["policy.iterations"])


def test_tagged_unions_and_literals_in_any_dataclass():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class A:
        kind: Literal["a"] = "a"
        x: int = 0

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class B:
        kind: Literal["b"] = "b"
        y: tuple[float, ...] = ()

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Top:
        part: A | B = A()
        k: int | Literal["auto"] = 1

    assert from_dict(Top, {"part": {"kind": "b", "y": [1, 2.5]}, "k": "auto"}) == Top(part=B(y=(1.0, 2.5)), k="auto")
    assert from_dict(Top, {"part": {"x": 3}}) == Top(part=A(x=3))  # no tag: the default's kind
    with pytest.raises(ConfigError, match="k: expected int or one of 'auto', got 'many'"):
        from_dict(Top, {"k": "many"})
    assert to_dict(Top(part=B(y=(1.0,)))) == {"part": {"kind": "b", "y": [1.0]}, "k": 1}


def test_print_config_shows_the_resolved_tree(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("policy: {iterations: 5}\n")
    assert main(["run", str(path), "--set", "seed=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["policy"]["iterations"] == 5 and printed["seed"] == 3
    assert printed["rewards"]["em"]["num_groups"] == 2 and printed["preferences"]["source"] == "world"
    assert load_config(None, overrides=["policy.iterations=5", "seed=3"]) == from_dict(RunConfig, printed)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("ppo:\n  learning_rat: 0.1\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "run.yaml:ppo: unknown key" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_sampling_config_refuses_what_would_sample_wrongly():
    for bad in (dict(top_p=0.0), dict(top_p=-0.5), dict(top_p=1.5), dict(top_k=0), dict(temperature=-1.0),
                dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    assert SamplingConfig(eos_token_id=[1, 2]).eos_token_id == (1, 2)  # hashable, a static jit argument
    hash(SamplingConfig(eos_token_id=[1, 2]))


def test_every_section_default_is_a_valid_config():
    cfg = RunConfig()
    assert isinstance(cfg.preferences, WorldPreferences) and isinstance(cfg.model, ScratchModel)
    assert isinstance(cfg.rewards, FitRewards) and cfg.rewards.em.num_groups == 2


@pytest.mark.parametrize("name", ["gpt2_imdb.yaml", "tulu2_7b_psoups.yaml"])
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "dpo", "ipo"])
def test_shipped_configs_run_every_algorithm(name, algorithm, capsys):
    """The critic-free and offline variants their headers document (`--algorithm X`) load, validate and plan."""
    from maxmin_jax.cli import main
    from maxmin_jax.pipeline import stage_plan

    assert main(["run", str(CONFIGS / name), "--algorithm", algorithm, "--print-config"]) == 0
    cfg = from_dict(RunConfig, yaml.safe_load(capsys.readouterr().out))
    assert cfg.policy.algorithms == (algorithm,)
    plan = stage_plan(cfg)
    assert set(plan[f"policy/maxmin/{algorithm}"]["policy"]) >= ({"critic_free", "group_size"}
                                                                  if algorithm in ("grpo", "rloo")
                                                                  else {"preference", "pair_batch", "membership"})
    assert "ppo" not in plan[f"policy/maxmin/{algorithm}"]["policy"]


@pytest.mark.parametrize("text, message", [
    ("policy: {algorithms: [ppo, a2c]}\n", r"policy.algorithms\[1\]: expected one of 'ppo', 'grpo', 'rloo', 'dpo'"),
    ("policy: {algorithms: [grpo], group_size: 1}\n", r"grpo and rloo .* need group_size >= 2"),
    ("policy: {algorithms: [rloo], prompt_batch: 12, group_size: 3, critic_free: {minibatches: 8}}\n",
     r"prompt_batch: 12 responses are not divisible by critic_free.minibatches=8"),
    ("policy: {algorithms: [grpo], prompt_batch: 64, group_size: 3}\n",
     r"prompt_batch: 64 responses are not divisible by group_size=3"),
    ("mesh: {fsdp: 8}\npolicy: {algorithms: [grpo], prompt_batch: 64, group_size: 16}\n",
     r"prompt_batch / group_size \(grpo, rloo prompts\): 4 is not divisible by mesh data \* fsdp = 8"),
    ("policy: {algorithms: [dpo], objectives: [maxmin_sample]}\n", r"'maxmin_sample' .* no offline meaning"),
    ("policy: {algorithms: [dpo], membership: fuzzy}\n", r"policy.membership: expected one of 'hard', 'soft'"),
    ("mesh: {fsdp: 8}\npolicy: {algorithms: [dpo], prompt_batch: 64, pair_batch: 12}\n",
     r"policy.pair_batch: 12 is not divisible by mesh data \* fsdp = 8"),
])
def test_algorithm_settings_are_checked(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)
