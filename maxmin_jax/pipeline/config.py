"""The config tree of a run: frozen keyword-only dataclasses, one per section; its defaults are the demo.

```
RunConfig
  seed
  preferences   tagged by `source`: world (a synthetic world with known group rewards) | files | psoups
  model         tagged by `source`: scratch (a small GPT-2 trained on the world's texts) | pretrained (HF)
  prompts       where rollout and evaluation prompts come from (None: the world's)
  prompt_template, mesh, lora
  rewards       tagged by `source`: fit (EM mixture + pooled single reward) | load (a `fit-rewards` directory)
  sampling      one SamplingConfig for rollouts, standardisation and evaluation
  policy        objectives x algorithms (ppo, grpo, rloo, dpo, ipo) to train, their settings, iterations, checkpoints
  evaluation    prompt counts and batch size
```

Read from YAML with `maxmin_jax.config_io` (unknown keys and wrong types name their key path);
`maxmin-jax run CONFIG --print-config` prints the resolved tree. `RunConfig()` is the demo (`configs/demo.yaml` is
the same tree written out; a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from maxmin_jax import validate
from maxmin_jax.errors import ConfigError
from maxmin_jax.generate import SamplingConfig
from maxmin_jax.policy.critic_free import CriticFreeConfig
from maxmin_jax.policy.objectives import OBJECTIVES
from maxmin_jax.policy.offline import PreferenceConfig
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.sft import SFTConfig
from maxmin_jax.pipeline.worlds import WorldSpec
from maxmin_jax.rewards.em import EMConfig, MStepConfig

Algorithm = Literal["ppo", "grpo", "rloo", "dpo", "ipo"]
ALGORITHMS: tuple[str, ...] = ("ppo", "grpo", "rloo", "dpo", "ipo")
CRITIC_FREE = ("grpo", "rloo")
"""Online without a value head: each prompt sampled `policy.group_size` times, advantages within the prompt."""
OFFLINE = ("dpo", "ipo")
"""Offline on the run's preference pairs, each pair weighted by its user's EM group membership."""
ALGORITHM_SETTINGS = {"ppo": ("ppo",), "grpo": ("critic_free", "group_size", "grpo_variant"),
                      "rloo": ("critic_free", "group_size"), "dpo": ("preference", "pair_batch", "membership"),
                      "ipo": ("preference", "pair_batch", "membership")}
"""The `policy` keys each algorithm reads (a policy's fingerprint leaves out the other algorithms')."""
DTYPES = ("float32", "bfloat16")


# Preferences --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldPreferences:
    """Preferences labelled by the simulated users of a synthetic world, whose true group rewards are known."""

    source: Literal["world"] = "world"
    world: WorldSpec = WorldSpec.__config_load__({"name": "review", "num_users": 110, "majority_share": 10 / 11,
                                                  "pairs_per_user": 16, "bt_temperature": 0.5, "seed": 0},
                                                 "preferences.world")
    """The world; its own `seed` fixes who is in which group and the labels."""
    heldout_fraction: float = 0.2
    """Share of each user's pairs held out to score the fitted rewards (0: none)."""

    def __post_init__(self):
        validate.proper_fraction(self, "heldout_fraction")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilePreferences:
    """Rows user_id, prompt, chosen, rejected from files or hub datasets."""

    source: Literal["files"] = "files"
    files: dict[str, str] | str
    """One source (user groups unknown: no ARI), or {group: source} (each user's known group, for the ARI). A source
    is a .jsonl/.json/.parquet/.csv file, a local dataset folder or a hub dataset id."""
    columns: dict[str, str] | None = None
    """Our field -> the source's column name, e.g. {chosen: response_a}."""
    users_per_group: int | None = None
    """With {group: source}: synthetic users per group, row j -> user j % users_per_group (None: ids from the data)."""
    split: str = "train"
    """Split read from hub datasets and dataset folders."""
    skip_invalid: bool = False
    """Skip (and count) invalid rows instead of stopping at the first."""
    coerce_user_id: bool = False
    """Accept numeric user ids as strings."""
    heldout_fraction: float = 0.1
    """Share of each user's pairs held out to score the fitted rewards (0: none)."""

    def __post_init__(self):
        validate.proper_fraction(self, "heldout_fraction")
        validate.positive_int(self, "users_per_group", optional=True)
        validate.require(self.users_per_group is None or not isinstance(self.files, str), self, "users_per_group",
                         "needs one source per group (files: {group: path})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PSoupsPreferences:
    """P-Soups files, one per preference: columns user_input, completion_a (preferred), completion_b. The files
    name no annotators: each gets `users_per_group` synthetic users, and its name is their true group."""

    source: Literal["psoups"] = "psoups"
    files: dict[str, str]
    """{preference name: file, dataset folder or hub dataset id}."""
    users_per_group: int = 10
    split: str = "train"
    skip_invalid: bool = False
    heldout_fraction: float = 0.1

    def __post_init__(self):
        validate.proper_fraction(self, "heldout_fraction")
        validate.positive_int(self, "users_per_group")


PreferencesSource = WorldPreferences | FilePreferences | PSoupsPreferences


# Models -------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ScratchModel:
    """A small GPT-2 trained from scratch (SFT) on the world's texts, with the world's tokenizer; the SFT model is
    the starting policy, the reference and the reward backbone."""

    source: Literal["scratch"] = "scratch"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 64
    sft_examples: int = 4096
    """Texts sampled from the world for SFT."""
    sft: SFTConfig = SFTConfig(steps=200, batch_size=32, learning_rate=3e-3)

    def __post_init__(self):
        validate.positive_int(self, "hidden_size", "num_layers", "num_heads", "max_position_embeddings",
                              "sft_examples")
        validate.require(self.hidden_size % self.num_heads == 0, self, "hidden_size",
                         f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainedModel:
    """Hugging Face checkpoints (hub ids or local directories) for the policy and the reward backbone."""

    source: Literal["pretrained"] = "pretrained"
    policy: str
    """Policy (and reference) checkpoint, e.g. gpt2 or allenai/tulu-2-7b."""
    reward_backbone: str | None = None
    """Reward-model backbone; None: the policy's. It must share the policy's vocabulary."""
    tokenizer: str | None = None
    """Tokenizer; None: the policy's. Pads with EOS when it has no pad token."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and compute dtype."""


ModelSource = ScratchModel | PretrainedModel


# Placement and adapters ---------------------------------------------------------------------------------------------
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
        validate.positive_int(self, "data", "fsdp", "tensor")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_ways(self) -> int:
        return self.data * self.fsdp

    def build(self, devices=None):
        """The mesh, after checking it uses exactly the available devices (a ConfigError says how to fix it)."""
        import jax

        from maxmin_jax.sharding import make_mesh

        devices = list(jax.devices() if devices is None else devices)
        if self.size != len(devices):
            kinds = sorted({d.platform for d in devices})
            raise ConfigError(
                f"mesh: data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} needs {self.size} devices, "
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
        validate.positive_int(self, "rank")
        validate.positive(self, "alpha", optional=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA per model; a missing entry means that model is fully fine-tuned."""

    policy: LoraSpec | None = None
    """Adapters on each trained policy: only they and the value head train, and the reference is the same weights
    with the adapters off (one copy of the base model)."""
    reward: LoraSpec | None = None
    """Adapters on the reward backbone (each reward model gets its own): EM trains them and the reward heads."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptsConfig:
    """Prompts for rollouts, reward standardisation and evaluation."""

    source: str
    """A .txt file (one prompt per line), a .jsonl/.json/.parquet/.csv file, a local dataset folder, or a hub
    dataset id (read with `datasets.load_dataset(source, split=split)`)."""
    split: str = "train"
    column: str = "prompt"
    """Column holding the prompt text (tables and datasets; ignored for .txt)."""
    max_tokens: int | None = None
    """Keep only the first N tokens of each prompt (the paper uses the first 8 tokens of IMDB reviews), before the
    prompt template goes around them. A prompt still too long for the model next to `sampling.max_new_tokens` is
    an invalid row (see `skip_invalid`)."""
    max_prompts: int | None = None
    """Use only the first N rows of the source (None: all)."""
    skip_invalid: bool = False
    """Skip (and count) invalid prompts (empty, not text, too long for the model next to the response budget)
    instead of stopping at the first; every one is an error naming its file and row otherwise."""

    def __post_init__(self):
        validate.positive_int(self, "max_tokens", "max_prompts", optional=True)


# Rewards ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class FitRewards:
    """Fit the EM mixture of K reward models and the pooled single reward on the preferences."""

    source: Literal["fit"] = "fit"
    em: EMConfig = EMConfig(num_groups=2, rounds=3, steps_per_round=40, batch_size=64,
                            m_step=MStepConfig(learning_rate=1e-3))
    """EM over users (K heads on one backbone, or K backbones)."""
    single_reward_steps: int = 120
    """Optimiser steps of the pooled single reward (the standard-RLHF baseline), with em.m_step and em.batch_size;
    0 fits none (then the `single` objective is unavailable)."""
    shared_backbone: bool = True
    """K heads on one backbone (one forward pass for all K rewards); False: K backbones, as in the paper."""

    def __post_init__(self):
        validate.non_negative_int(self, "single_reward_steps")
        # EM's optimiser, checked here until MStepConfig checks itself: a bad rate fails now, not after every
        # M-step of the fit was rejected.
        validate.check_optimizer(self.em.m_step, within=self, at="em.m_step")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadRewards:
    """Reward models written by `maxmin-jax fit-rewards` (reward_model/, em_history.json)."""

    source: Literal["load"] = "load"
    path: str
    """The fit-rewards output directory. A K=1 model serves the `single` objective."""


RewardsSource = FitRewards | LoadRewards


# Policy training and evaluation -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """Policies to train: every (objective, algorithm) pair, each from the same start."""

    objectives: tuple[str, ...] = ("single", "utilitarian", "maxmin")
    """Social-choice objectives; "single" uses the pooled single reward (offline: the pooled pairs), the others
    the mixture (offline: the EM groups)."""
    algorithms: tuple[Algorithm, ...] = ("ppo",)
    """Policy-optimisation algorithms: ppo (with a value head), grpo and rloo (critic-free, online), dpo and ipo
    (offline, on the run's preference pairs)."""
    softmin_temperature: float = 0.5
    """Temperature of the `softmin` objective."""
    dro_step_size: float = 0.5
    """Exponentiated-gradient step of the `dro` objective (offline: group-robust weights by mirror descent)."""
    ppo: PPOConfig = PPOConfig(learning_rate=1e-3, init_kl_coef=0.02, epochs=2, minibatches=2, early_stop_kl=0.2)
    """The demo's PPO: a large learning rate for a small model and 30 iterations, so an update's KL early stop
    (early_stop_kl, per token) undoes the rare minibatch step that jumps (docs/report.md)."""
    critic_free: CriticFreeConfig = CriticFreeConfig(learning_rate=1e-3, kl_coef=0.02, epochs=2, minibatches=2,
                                                     early_stop_kl=0.2)
    """The update of grpo and rloo (its minibatches divide the prompt_batch responses)."""
    group_size: int = 4
    """grpo, rloo: responses sampled per prompt, the group each is compared with (prompt_batch / group_size
    prompts per iteration)."""
    grpo_variant: Literal["grpo", "dr_grpo"] = "grpo"
    """grpo: rewards standardised within the prompt's samples, token losses averaged per response (GRPO), or
    centred only, token losses summed over a constant (Dr.GRPO)."""
    preference: PreferenceConfig = PreferenceConfig(beta=0.1, learning_rate=1e-3)
    """dpo, ipo: beta and the optimiser (its `loss` is the algorithm's)."""
    pair_batch: int = 64
    """dpo, ipo: preference pairs per optimiser step (one step per iteration)."""
    membership: Literal["hard", "soft"] = "hard"
    """dpo, ipo: a pair's group weights, from its user's EM assignment (one-hot) or responsibilities."""
    iterations: int = 30
    """Iterations per policy (offline: optimiser steps). May grow between reruns: training continues from the last
    checkpoint."""
    prompt_batch: int = 64
    """Responses sampled per iteration by the online algorithms, the same budget for each: ppo samples one for each
    of prompt_batch prompts, grpo and rloo group_size for each of prompt_batch / group_size prompts. Divisible by
    ppo.minibatches and by mesh data * fsdp (so is prompt_batch / group_size)."""
    checkpoint_every: int = 10
    """Save the full training state every N iterations (and at the end); a rerun resumes from the last one."""
    export: bool = True
    """Write each trained policy to policies/NAME/: an HF checkpoint (with the tokenizer), or under LoRA the
    adapters and value head (trainable.npz, adapter_config.json)."""

    def __post_init__(self):
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        validate.require(not unknown, self, "objectives",
                         f"unknown {unknown}; expected names from {', '.join(OBJECTIVES)}")
        for name in ("objectives", "algorithms"):
            values = getattr(self, name)
            validate.require(len(set(values)) == len(values) and bool(values), self, name,
                             f"expected distinct names, got {list(values)}")
        validate.positive_int(self, "iterations", "prompt_batch", "checkpoint_every", "group_size", "pair_batch")
        if "ppo" in self.algorithms:
            validate.require(self.prompt_batch % self.ppo.minibatches == 0, self, "prompt_batch",
                             f"{self.prompt_batch} is not divisible by ppo.minibatches={self.ppo.minibatches}")
        if set(CRITIC_FREE) & set(self.algorithms):
            validate.require(self.group_size >= 2, self, "group_size",
                             f"{self.group_size}: grpo and rloo compare each response with the other samples of its "
                             "prompt, so they need group_size >= 2")
            validate.require(self.prompt_batch % self.group_size == 0, self, "prompt_batch",
                             f"{self.prompt_batch} responses are not divisible by group_size={self.group_size} (grpo "
                             "and rloo sample prompt_batch / group_size prompts)")
            validate.require(self.prompt_batch % self.critic_free.minibatches == 0, self, "prompt_batch",
                             f"{self.prompt_batch} responses are not divisible by critic_free.minibatches="
                             f"{self.critic_free.minibatches}")
        validate.require(not (set(OFFLINE) & set(self.algorithms) and "maxmin_sample" in self.objectives), self,
                         "objectives", "'maxmin_sample' takes each sample's worst group, which has no offline meaning "
                         "(a pair belongs to its user's group); train dpo / ipo with maxmin instead")
        validate.positive(self, "softmin_temperature")
        validate.non_negative(self, "dro_step_size")

    def runs(self) -> list[tuple[str, str]]:
        """(objective, algorithm) of every policy to train, in order."""
        return [(o, a) for a in self.algorithms for o in self.objectives]

    def name(self, objective: str, algorithm: str) -> str:
        """The policy's name in reports and directories: the objective, with the algorithm when there are several."""
        return objective if len(self.algorithms) == 1 else f"{objective}-{algorithm}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Reward standardisation and evaluation, on the same prompts for every policy."""

    standardizer_prompts: int = 512
    """Reference samples that standardise each reward head (its mean and std on them: 0 and 1)."""
    prompts: int = 512
    """Prompts each policy is evaluated on."""
    batch_size: int = 64
    """Prompts per evaluation pass; divides both counts above."""
    examples: int = 3
    """Decoded responses of each policy shown in the report."""
    bootstrap_resamples: int = 2000
    """Resamples of the evaluation prompts behind every interval of the report (paired across policies)."""
    confidence: float = 0.95
    """Level of the report's intervals (bootstrap over prompts; Student t across seeds)."""

    def __post_init__(self):
        validate.positive_int(self, "standardizer_prompts", "prompts", "batch_size")
        validate.non_negative_int(self, "examples")
        validate.require(self.bootstrap_resamples >= 100, self, "bootstrap_resamples",
                         f"expected an integer >= 100, got {self.bootstrap_resamples}")
        validate.require(0.5 < self.confidence < 1, self, "confidence",
                         f"expected a level in (0.5, 1), got {self.confidence}")
        for name in ("standardizer_prompts", "prompts"):
            validate.require(getattr(self, name) % self.batch_size == 0, self, name,
                             f"{getattr(self, name)} is not a multiple of batch_size={self.batch_size}")


# The run ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run needs. The defaults are the demo: the review world at 10:1, a small GPT-2 trained from
    scratch, EM with K=2, PPO for single / utilitarian / maxmin from the same start."""

    seed: int = 0
    """Seeds model initialisation, EM, prompt draws and sampling."""
    seeds: tuple[int, ...] | None = None
    """Run the whole pipeline once per seed (each its own directory OUT/seed-N, with `seed` and the world's own
    `seed` set to N) and report means and intervals across seeds; None: one run with `seed`."""
    preferences: PreferencesSource | None = WorldPreferences()
    """Labelled comparisons for the reward models (None: rewards are loaded)."""
    model: ModelSource = ScratchModel()
    prompts: PromptsConfig | None = None
    """Rollout and evaluation prompts; None: the world's."""
    prompt_template: str | None = None
    """Format string with one {prompt} (e.g. Tulu's "<|user|>\\n{prompt}\\n<|assistant|>\\n"), applied to rollout
    prompts and to the prompts of preference rows, so reward models are fitted on what they later score."""
    mesh: MeshConfig | None = None
    """Device mesh (it must use every device JAX sees); None: one device, nothing sharded."""
    lora: LoraConfig | None = None
    """LoRA adapters per model; None fine-tunes everything."""
    rewards: RewardsSource = FitRewards()
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=32)
    """Sampling in rollouts, standardisation and evaluation; EOS (when unset) and pad come from the tokenizer."""
    policy: PolicyConfig = PolicyConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tensorboard: bool = True
    """Also write the metrics stream as TensorBoard event files (tensorboard/)."""

    def __post_init__(self):
        require = functools.partial(validate.require, obj=self)
        seeds = self.seeds
        require(seeds is None or (len(seeds) >= 2 and len(set(seeds)) == len(seeds)), key="seeds",
                detail=f"expected at least 2 distinct seeds (or null for one run with `seed`), got "
                       f"{None if self.seeds is None else list(self.seeds)}")
        validate.non_negative_int(self, "seed")
        require(self.prompt_template is None or "{prompt}" in self.prompt_template, key="prompt_template",
                detail=f"expected a format string with {{prompt}}, got {self.prompt_template!r}")
        scratch = isinstance(self.model, ScratchModel)
        require(not scratch or isinstance(self.preferences, WorldPreferences), key="model.source",
                detail="'scratch' trains a GPT-2 on the world's texts: it needs preferences.source 'world'")
        require(self.sampling.temperature > 0, key="sampling.temperature",
                detail="expected > 0: policies are trained on what they sample")
        if scratch:
            positions = self.model.max_position_embeddings
            require(self.sampling.max_new_tokens < positions, key="sampling.max_new_tokens",
                    detail=f"{self.sampling.max_new_tokens} leaves no room for a prompt in the model's {positions} "
                           "positions (model.max_position_embeddings)")
            self._check_lora_targets("gpt2")
        if self.mesh is not None:
            ways = self.mesh.batch_ways
            critic_free = set(CRITIC_FREE) & set(self.policy.algorithms)
            for name, value in (("policy.prompt_batch", self.policy.prompt_batch),
                                ("policy.pair_batch", self.policy.pair_batch),
                                ("policy.prompt_batch / group_size (grpo, rloo prompts)",
                                 self.policy.prompt_batch // self.policy.group_size if critic_free else ways),
                                ("evaluation.batch_size", self.evaluation.batch_size)):
                require(value % ways == 0, key=name, detail=f"{value} is not divisible by mesh data * fsdp = {ways}")

    def _check_lora_targets(self, model_type: str) -> None:
        from maxmin_jax.models.lora import LORA_SPECS

        for which in ("policy", "reward"):
            spec = getattr(self.lora, which) if self.lora is not None else None
            targets = spec.targets if spec is not None else None
            targets = (targets,) if isinstance(targets, str) and targets != "all" else targets
            if targets not in (None, "all"):
                unknown = [t for t in targets if t not in LORA_SPECS[model_type]]
                validate.require(not unknown, self, f"lora.{which}.targets",
                                 f"unknown {unknown} for {model_type}; expected names from "
                                 f"{', '.join(LORA_SPECS[model_type])} or 'all'")

    def format_prompt(self, prompt: str) -> str:
        return prompt if self.prompt_template is None else self.prompt_template.replace("{prompt}", prompt)


__all__ = ["ALGORITHMS", "ALGORITHM_SETTINGS", "CRITIC_FREE", "OFFLINE", "EvaluationConfig", "FilePreferences", "FitRewards", "LoadRewards", "LoraConfig", "LoraSpec",
           "MeshConfig", "ModelSource", "PSoupsPreferences", "PolicyConfig", "PreferencesSource", "PretrainedModel",
           "PromptsConfig", "RewardsSource", "RunConfig", "ScratchModel", "WorldPreferences", "WorldSpec"]
