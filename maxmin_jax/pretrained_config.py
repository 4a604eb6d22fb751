"""Configuration of experiments on pretrained Hugging Face models (`maxmin_jax.pretrained_experiment`).

Frozen keyword-only dataclasses, read strictly from YAML by `maxmin_jax.config_io.load_yaml`; see
`configs/gpt2_imdb.yaml` and `configs/tulu2_7b_psoups.yaml`. A YAML file is recognised as one of these by its
top-level `experiment: pretrained` marker (`is_pretrained_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from maxmin_jax.policy.objectives import OBJECTIVES
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import RolloutConfig
from maxmin_jax.rewards.em import EMConfig, MStepConfig

MARKER = "pretrained"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); the product must equal the number of devices JAX sees."""

    data: int = 1
    """Data-parallel replicas (the batch is split over data and fsdp)."""
    fsdp: int = 1
    """Fully sharded data parallel: parameters split on the embedding axis, batch split too."""
    tensor: int = 1
    """Tensor parallel: heads, MLP and vocabulary split."""

    def __post_init__(self):
        if min(self.data, self.fsdp, self.tensor) < 1:
            raise ValueError(f"mesh axes must be >= 1, got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    def build(self, devices=None) -> jax.sharding.Mesh:
        """The mesh, after checking it uses exactly the available devices (a ValueError says how to fix it)."""
        from maxmin_jax.sharding import make_mesh

        devices = list(jax.devices() if devices is None else devices)
        if self.size != len(devices):
            kinds = sorted({d.platform for d in devices})
            raise ValueError(
                f"config mesh data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} needs {self.size} devices, "
                f"but JAX sees {len(devices)} ({', '.join(kinds)}); set mesh so that data * fsdp * tensor = "
                f"{len(devices)} (e.g. mesh: {{fsdp: {len(devices)}}}), or run on a host with {self.size} devices")
        return make_mesh(data=self.data, fsdp=self.fsdp, tensor=self.tensor, devices=devices)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """Low-rank adapters on one model (`maxmin_jax.models.lora.add_lora`); the base weights stay frozen."""

    rank: int
    """Adapter rank r."""
    alpha: float | None = None
    """Scale numerator: the update is (alpha / r) * x A B; None means alpha = r."""
    targets: tuple[str, ...] | str | None = None
    """Adapted weights (e.g. [q, v] for Llama, [qkv] for GPT-2), "all", or None for the family default."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA per model; a missing entry means that model is fully fine-tuned."""

    policy: LoraSpec | None = None
    """Adapters on each trained policy; PPO then trains only them and the value head, and the reference policy is
    the same weights with the adapters off (one copy of the base model)."""
    reward: LoraSpec | None = None
    """Adapters on the reward backbone (each reward model gets its own); EM trains them and the reward heads."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceDataConfig:
    """Where the labelled comparisons come from: exactly one of `psoups` and `files`."""

    psoups: dict[str, str] | None = None
    """P-Soups layout, one file (or hub dataset) per preference: {group: path}; columns user_input,
    completion_a (preferred), completion_b. Each file's users are synthetic (see `users_per_group`)."""
    files: dict[str, str] | str | None = None
    """Generic rows user_id, prompt, chosen, rejected: {group: file or hub dataset} (one source per group, the
    group is each user's known label), or one source whose groups are unknown (no ARI then)."""
    columns: dict[str, str] | None = None
    """For `files`: our field -> the source's column name, e.g. {chosen: response_a}."""
    users_per_group: int | None = None
    """Synthetic users per group: row j of a group's file goes to user j % users_per_group (the paper's code).
    Needed for P-Soups (default 10 there); for `files` None means the user ids come from the data."""
    split: str = "train"
    """Split read from hub datasets (local files are a single split)."""
    skip_invalid: bool = False
    """Skip (and count) invalid rows instead of stopping at the first."""
    heldout_fraction: float = 0.1
    """Share of each user's pairs held out to score the fitted mixture and single reward (0: none)."""

    def __post_init__(self):
        if (self.psoups is None) == (self.files is None):
            raise ValueError("preferences: give exactly one of psoups ({group: file}) and files")
        for name in ("psoups", "columns"):
            value = getattr(self, name)
            if value is not None and not _str_mapping(value):
                raise ValueError(f"preferences.{name}: expected a mapping of strings, got {value!r}")
        if self.files is not None and not (isinstance(self.files, str) or _str_mapping(self.files)):
            raise ValueError(f"preferences.files: expected a path or {{group: path}}, got {self.files!r}")
        if self.psoups is not None and self.columns is not None:
            raise ValueError("preferences.columns applies to files; P-Soups columns are fixed")
        if self.users_per_group is not None and self.users_per_group < 1:
            raise ValueError(f"preferences.users_per_group must be >= 1, got {self.users_per_group}")
        if isinstance(self.files, str) and self.users_per_group is not None:
            raise ValueError("preferences.users_per_group needs one source per group (files: {group: path})")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"preferences.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptsConfig:
    """Prompts for PPO rollouts, reward standardisation and evaluation."""

    source: str
    """A .txt file (one prompt per line), a .jsonl/.json/.parquet/.csv file, a local dataset folder, or a hub
    dataset id (read with `datasets.load_dataset(source, split=split)`)."""
    split: str = "train"
    """Split of a hub dataset or dataset folder."""
    column: str = "prompt"
    """Column holding the prompt text (tables and datasets; ignored for .txt)."""
    max_tokens: int | None = None
    """Keep only the first N tokens of each prompt (the paper uses the first 8 tokens of IMDB reviews). With
    None, prompts longer than the model allows next to `rollout.max_new_tokens` are skipped and counted."""
    max_prompts: int | None = None
    """Use only the first N rows of the source (None: all)."""

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"prompts.max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"prompts.max_prompts must be >= 1, got {self.max_prompts}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainedExperimentConfig:
    """MaxMin-RLHF on a pretrained HF model: EM reward mixture on real preferences, PPO per objective, report."""

    experiment: str = MARKER
    """Marker telling `maxmin-jax run` which experiment a YAML file describes; must be "pretrained"."""
    policy: str
    """Policy (and reference) checkpoint: hub id (e.g. gpt2, allenai/tulu-2-7b) or local HF directory."""
    reward_backbone: str | None = None
    """Reward-model backbone, hub id or directory; None uses the policy's. It must share the policy's
    vocabulary: reward models score the policy's token ids."""
    tokenizer: str | None = None
    """Tokenizer (hub id or directory); None uses the policy's. Pads with EOS when it has no pad token."""
    dtype: str = "float32"
    """Parameter and compute dtype of the loaded models: "float32" or "bfloat16"."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh; must use every device JAX sees."""
    lora: LoraConfig | None = None
    """LoRA adapters per model; None fine-tunes everything."""
    preferences: PreferenceDataConfig
    """Labelled comparisons for the reward models."""
    prompts: PromptsConfig
    """Prompts for rollouts and evaluation."""
    prompt_template: str | None = None
    """Format string with one {prompt} (e.g. Tulu's "<|user|>\\n{prompt}\\n<|assistant|>\\n"), applied to rollout
    prompts and to the prompts of preference rows, so reward models are fitted on what they later score."""
    em: EMConfig = EMConfig(num_groups=2, rounds=4, steps_per_round=50, batch_size=32,
                            m_step=MStepConfig(learning_rate=1e-5))
    """EM over users for the K-group reward mixture (K heads on one backbone)."""
    single_reward_steps: int = 200
    """Optimiser steps of the pooled single reward (K = 1; the standard-RLHF baseline), with `em.m_step`."""
    objectives: tuple[str, ...] = ("single", "utilitarian", "maxmin")
    """Policies to train, each from the same start; "single" uses the single reward, the others the mixture."""
    softmin_temperature: float = 0.5
    """Temperature of the `softmin` objective."""
    dro_step_size: float = 0.5
    """Exponentiated-gradient step of the `dro` objective."""
    ppo: PPOConfig = PPOConfig()
    """PPO hyperparameters."""
    rollout: RolloutConfig = RolloutConfig()
    """Sampling during training and evaluation; EOS and pad ids default to the tokenizer's."""
    iterations: int = 100
    """PPO iterations per objective."""
    prompt_batch: int = 32
    """Prompts per PPO iteration; divisible by ppo.minibatches and by mesh data * fsdp."""
    standardizer_prompts: int = 256
    """Reference samples used to standardise each reward head."""
    eval_prompts: int = 256
    """Prompts each policy is evaluated on."""
    eval_batch_size: int = 32
    """Prompts per evaluation forward pass; divides standardizer_prompts and eval_prompts."""
    save_policies: bool = True
    """Write each trained policy: its LoRA adapters and value head (policies/NAME/trainable.npz), or, without
    LoRA, the whole model as an HF checkpoint (policies/NAME/)."""
    seed: int = 0
    """Seeds adapters, heads, EM, prompt draws and sampling."""

    def __post_init__(self):
        if self.experiment != MARKER:
            raise ValueError(f"experiment: expected {MARKER!r}, got {self.experiment!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"objectives: unknown {unknown}; choose from {list(OBJECTIVES)}")
        if min(self.iterations, self.prompt_batch, self.standardizer_prompts, self.eval_prompts,
               self.eval_batch_size) < 1 or self.single_reward_steps < 0:
            raise ValueError("iterations, prompt_batch, standardizer_prompts, eval_prompts and eval_batch_size must "
                             "be >= 1 and single_reward_steps >= 0")
        if self.prompt_batch % self.ppo.minibatches:
            raise ValueError(f"prompt_batch={self.prompt_batch} is not divisible by ppo.minibatches="
                             f"{self.ppo.minibatches}")
        ways = self.mesh.data * self.mesh.fsdp
        if self.prompt_batch % ways:
            raise ValueError(f"prompt_batch={self.prompt_batch} is not divisible by mesh data * fsdp = {ways}")
        for name in ("standardizer_prompts", "eval_prompts"):
            if getattr(self, name) % self.eval_batch_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of eval_batch_size="
                                 f"{self.eval_batch_size}")
        if self.eval_batch_size % ways:
            raise ValueError(f"eval_batch_size={self.eval_batch_size} is not divisible by mesh data * fsdp = {ways}")

        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{prompt}}, got {self.prompt_template!r}")

    def format_prompt(self, prompt: str) -> str:
        return prompt if self.prompt_template is None else self.prompt_template.replace("{prompt}", prompt)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def reward_path(self) -> str:
        return self.reward_backbone or self.policy


def _str_mapping(value) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def is_pretrained_config(path: str | Path) -> bool:
    """Whether a YAML file carries the `experiment: pretrained` marker (anything else is left to other loaders)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("experiment") == MARKER


def load_pretrained_config(path: str | Path) -> PretrainedExperimentConfig:
    """Strictly parse a YAML file (unknown keys and wrong types name their path)."""
    from maxmin_jax.config_io import load_yaml

    return load_yaml(PretrainedExperimentConfig, path)


__all__ = ["DTYPES", "LoraConfig", "LoraSpec", "MeshConfig", "PreferenceDataConfig", "PretrainedExperimentConfig",
           "PromptsConfig", "is_pretrained_config", "load_pretrained_config"]
