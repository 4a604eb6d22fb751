"""`fit_rewards`: preference rows (or a PairBatch) + a backbone -> EM mixture of reward models, written to disk.

Output directory:
- assignments.json   `{user_id: cluster}`
- em_history.json    per-round history (training and held-out log-likelihoods, group sizes, changed users, M-step
                     accuracy, who assigned users), the initialisation and K selection, restart agreement,
                     warnings, mixing weights, responsibilities, clustering metrics, the config (strict JSON)
- em_history.png     the same at a glance
- reward_model/      reward_model.json (model config, num_groups, shared_backbone) + state/ (Orbax)
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import jax
from flax import nnx

from maxmin_jax.data.batching import PairBatch, tokenize_pairs
from maxmin_jax.data.schema import PreferenceRow
from maxmin_jax.models import ModelConfig, build_model
from maxmin_jax.models.config import config_from_hf
from maxmin_jax.models.hf import CheckpointError, load_pretrained
from maxmin_jax.rewards.diagnostics import fit_warnings, plot_history, write_history
from maxmin_jax.rewards.em import EMConfig, EMResult, fit_em
from maxmin_jax.rewards.scoring import clustering_metrics
from maxmin_jax.rewards.model import build_reward_model
from maxmin_jax.rewards.mstep import MStepConfig

logger = logging.getLogger(__name__)

META_FILE = "reward_model.json"
STATE_DIR = "state"
FORMAT = "maxmin-jax-reward-model/1"


def fit_rewards(data: Iterable[PreferenceRow] | PairBatch, *, model_path_or_config: str | os.PathLike | ModelConfig,
                tokenizer=None, num_groups: int | str, out_dir: str | os.PathLike | None = None,
                shared_backbone: bool = True, heldout: PairBatch | None = None, config: EMConfig | None = None,
                learning_rate: float | None = None, m_step: MStepConfig | None = None, progress: bool = True,
                mesh=None, **em_options) -> EMResult:
    """Fit K reward models by EM over users and (with `out_dir`) write assignments, history and the model.

    `model_path_or_config`: an HF checkpoint directory (its tokenizer is loaded from the same directory with
    `transformers.AutoTokenizer` unless `tokenizer` is given), or a model config for a randomly initialised
    backbone (then `tokenizer` is needed to tokenise rows). EM's settings: `config`, or `EMConfig`'s defaults
    overridden by `em_options` (any EMConfig field, e.g. `method="soft"`, `rounds=5`, `seed=1`); `learning_rate`
    or `m_step` set the M-step's optimiser. With `out_dir`, warnings about the fit (a group of fewer than 2 users,
    restarts that disagree) are logged and written to em_history.json.
    """
    if config is None:
        if m_step is None:
            m_step = MStepConfig() if learning_rate is None else MStepConfig(learning_rate=learning_rate)
        config = EMConfig(num_groups=num_groups, m_step=m_step, progress=progress, **em_options)
    elif em_options or learning_rate is not None or m_step is not None:
        raise ValueError("fit_rewards: pass either config= or individual EM options, not both")
    seed = config.seed
    if isinstance(model_path_or_config, (str, os.PathLike)):
        path = model_path_or_config
        backbone = load_pretrained(path, mesh=mesh)
        if tokenizer is None and not isinstance(data, PairBatch):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None:  # GPT-2's tokenizer has none; pads are masked out anyway
                tokenizer.pad_token = tokenizer.eos_token
    else:
        backbone = build_model(model_path_or_config, rngs=nnx.Rngs(seed))
    if isinstance(data, PairBatch):
        batch = data
    else:
        if tokenizer is None:
            raise ValueError("fit_rewards: rows need a tokenizer (pass tokenizer=, or a checkpoint directory)")
        batch = tokenize_pairs(tokenizer, list(data), max_length=backbone.config.max_position_embeddings)
    heads = config.num_groups if config.num_groups != "auto" else 1  # fit_em resizes to the chosen K
    model = build_reward_model(backbone, heads, shared_backbone=shared_backbone, rngs=nnx.Rngs(seed))
    result = fit_em(model, batch, config, heldout=heldout, mesh=mesh)
    if batch.groups is not None:
        result.metrics.update(clustering_metrics(result.assignments, batch.groups))
    for message in fit_warnings(result):
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
    if out_dir is not None:
        write_result(result, out_dir, config=config)
    return result


def write_result(result: EMResult, out_dir: str | os.PathLike, *, config: EMConfig | None = None) -> Path:
    """assignments.json, em_history.json, em_history.png and reward_model/ in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "assignments.json").write_text(json.dumps(result.assignment_dict(), indent=2))
    write_history(result, out / "em_history.json", config)
    plot_history(result, out / "em_history.png")
    save_reward_model(result.model, out / "reward_model")
    return out


# Checkpoints ------------------------------------------------------------------------------------------------------
def save_reward_model(model: nnx.Module, directory: str | os.PathLike) -> Path:
    """Orbax checkpoint of the whole module state plus the JSON needed to rebuild the module around it."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model_config": model.config.to_hf(), "num_groups": model.num_groups,
            "shared_backbone": bool(model.shared_backbone)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / STATE_DIR, nnx.to_pure_dict(nnx.state(model)), force=True)
        ckptr.wait_until_finished()
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_reward_model(directory: str | os.PathLike, *, config: ModelConfig | None = None,
                      num_groups: int | None = None, shared_backbone: bool | None = None, mesh=None) -> nnx.Module:
    """Rebuild a reward model saved by `save_reward_model`, each array restored straight into its sharding.

    Refuses (CheckpointError, naming every difference) a checkpoint whose recorded config differs from what the
    caller expects (`config`, `num_groups`, `shared_backbone`), or whose arrays do not fit its recorded config.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{directory}: not a reward-model checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    saved_config = config_from_hf(meta["model_config"], source=str(meta_path))
    expected = {"model config": (config, saved_config), "num_groups": (num_groups, meta["num_groups"]),
                "shared_backbone": (shared_backbone, meta["shared_backbone"])}
    wrong = [f"{name}: checkpoint has {have}, expected {want}" for name, (want, have) in expected.items()
             if want is not None and want != have]
    if wrong:
        raise CheckpointError(f"{directory}: reward model does not match: " + "; ".join(wrong))

    abstract = nnx.eval_shape(lambda: build_reward_model(saved_config, meta["num_groups"],
                                                          shared_backbone=meta["shared_backbone"],
                                                          rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)
    if mesh is not None:
        from maxmin_jax.sharding import state_shardings

        shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        _check_arrays(ckptr.metadata(directory / STATE_DIR).item_metadata, target, directory)
        restored = ckptr.restore(directory / STATE_DIR, target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


def _check_arrays(stored, target, directory: Path) -> None:
    """Every array the recorded config needs is stored with its shape, and nothing else is stored."""
    def flat(tree):
        return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = flat(stored), flat(target)
    problems = []
    if missing := sorted(set(want) - set(have)):
        problems.append(f"missing arrays {missing}")
    if extra := sorted(set(have) - set(want)):
        problems.append(f"unexpected arrays {extra}")
    problems += [f"{k}: stored shape {tuple(have[k].shape)}, config needs {tuple(want[k].shape)}"
                 for k in sorted(set(have) & set(want)) if tuple(have[k].shape) != tuple(want[k].shape)]
    if problems:
        raise CheckpointError(f"{directory}: stored arrays do not fit the recorded config: " + "; ".join(problems))


__all__ = ["fit_rewards", "load_reward_model", "save_reward_model", "write_result"]
