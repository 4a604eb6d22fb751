"""The pipeline every runner shares: preferences -> reward fitting -> standardisation -> policy training ->
evaluation -> report, as stage functions over one config tree (`RunConfig`), with resumable stages.

    import maxmin_jax as mm
    cfg = mm.load_config("configs/demo.yaml")     # or mm.RunConfig() (the demo)
    report = mm.run(cfg, "out/demo")              # rerun to resume; a changed config is refused
"""

from typing import TYPE_CHECKING

from maxmin_jax.pipeline.config import (EvaluationConfig, FilePreferences, FitRewards, LoadRewards, LoraConfig,
                                        LoraSpec, MeshConfig, PolicyConfig, PretrainedModel, PromptsConfig,
                                        PSoupsPreferences, RunConfig, ScratchModel, WorldPreferences, WorldSpec)

if TYPE_CHECKING:
    from maxmin_jax.pipeline.runners import fit_rewards, run, stage_plan, train_policy

_RUNNERS = ("fit_rewards", "run", "stage_plan", "train_policy")


def __getattr__(name: str):
    """The runners on first use (PEP 562): they pull in orbax and datasets, which reading a config does not need."""
    if name not in _RUNNERS:
        raise AttributeError(f"module 'maxmin_jax.pipeline' has no attribute {name!r}")
    from maxmin_jax.pipeline import runners

    return getattr(runners, name)


def __dir__():
    return sorted(set(globals()) | set(_RUNNERS))


def load_config(path=None, *, overrides=()) -> RunConfig:
    """A RunConfig from a YAML file (None: the demo defaults) with `key.path=value` overrides applied."""
    from maxmin_jax.config_io import load_yaml

    return load_yaml(RunConfig, path, overrides=overrides)


__all__ = ["EvaluationConfig", "FilePreferences", "FitRewards", "LoadRewards", "LoraConfig", "LoraSpec", "MeshConfig",
           "PSoupsPreferences", "PolicyConfig", "PretrainedModel", "PromptsConfig", "RunConfig", "ScratchModel",
           "WorldPreferences", "WorldSpec", "fit_rewards", "load_config", "run", "stage_plan", "train_policy"]
