"""Runners over many runs of the pipeline: `run_seeds` (one config, several seeds) and `sweep` (a grid of settings).

Each run is an ordinary run directory (resumable, fingerprinted) below the output directory:

    OUT/seed-N/                   with `seeds: [...]`: the run of seed N; OUT/report.json aggregates them
    OUT/SETTING/ (or SETTING/seed-N/)   with `maxmin-jax sweep`: one run (or one per seed) per grid point;
                                  OUT/sweep.json and OUT/sweep.png summarise them

A sweep file is a run config with one more top-level key, `sweep`: {dotted config key: [values]}; every
combination of values is a setting, e.g. `sweep: {preferences.world.majority_share: [0.5, 0.75, 0.91, 0.97]}`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maxmin_jax.config_io import apply_overrides, dump_yaml, from_dict, read_yaml, to_dict
from maxmin_jax.errors import ConfigError, RunDirError
from maxmin_jax.pipeline.config import RunConfig, WorldPreferences
from maxmin_jax.pipeline.rundir import is_primary, write_json_atomic


# Seeds --------------------------------------------------------------------------------------------------------------
def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The config of one seed's run: `seed` set to it, and the world's own `seed` too (the world's users, groups
    and labels are part of what a seed redraws)."""
    preferences = cfg.preferences
    if isinstance(preferences, WorldPreferences) and "seed" in preferences.world.options:
        world = dataclasses.replace(preferences.world, options={**preferences.world.options, "seed": seed})
        preferences = dataclasses.replace(preferences, world=world)
    return dataclasses.replace(cfg, seed=seed, seeds=None, preferences=preferences)


def _refuse_single_run(out: Path) -> None:
    stages = [p.name for p in (out / "sft", out / "rewards", out / "standardize", out / "policy") if p.exists()]
    if stages:
        raise RunDirError(f"{out} holds a single run ({', '.join(stages)}/); a run over seeds writes OUT/seed-N/ "
                          "and the aggregate report: use another output directory")


def run_seeds(cfg: RunConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False) -> dict:
    """One whole run per seed of `cfg.seeds` (OUT/seed-N), then the report aggregated across seeds in OUT
    (`maxmin_jax.evaluation.seeds`). Each seed's run resumes like any run (`overwrite`: each starts afresh);
    returns the aggregate report."""
    from maxmin_jax.evaluation.seeds import aggregate
    from maxmin_jax.pipeline.runners import run
    from maxmin_jax.report import write_report

    out = Path(out)
    _refuse_single_run(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_primary():
        (out / "config.yaml").write_text(dump_yaml(cfg))
    reports = {seed: run(seed_config(cfg, seed), out / f"seed-{seed}", progress=progress, overwrite=overwrite)
               for seed in cfg.seeds}
    report = aggregate(reports, level=cfg.evaluation.confidence)
    report["runs"] = {str(seed): f"seed-{seed}" for seed in cfg.seeds}
    report["config"] = to_dict(cfg)
    if is_primary():
        write_report(report, out)
    return report


# Sweeps -------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid of settings over a base config: `points` are (name, {key: value}, config) in grid order."""

    grid: dict[str, tuple[Any, ...]]
    points: tuple[tuple[str, dict[str, Any], RunConfig], ...]
    base: RunConfig


def _set(data: dict, key: str, value: Any) -> dict:
    data = copy.deepcopy(data)
    node, parts = data, key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, Mapping) else {}
        node = child
    node[parts[-1]] = value
    return data


def _setting_name(setting: dict[str, Any]) -> str:
    """The setting's directory name, e.g. `majority_share=0.9091,distance=0.5` or `group_sizes=9_1`: short keys
    (unless two end alike), list items joined by "_", and nothing a path or Orbax's checkpoint paths would read
    differently (brackets, spaces, slashes become "_")."""
    short = [k.rsplit(".", 1)[-1] for k in setting]
    keys = short if len(set(short)) == len(short) else list(setting)

    def text(v) -> str:
        if isinstance(v, (list, tuple)):
            return "_".join(map(text, v))
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    name = ",".join(f"{k}={text(v)}" for k, v in zip(keys, setting.values()))
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def load_sweep(path: str | Path, *, overrides: tuple[str, ...] | list[str] = ()) -> Sweep:
    """A sweep file: a run config plus `sweep: {dotted.key: [values]}`. Every setting's config is built and
    checked before anything runs; errors name the file, the setting and the key."""
    data = apply_overrides(read_yaml(path), overrides)
    grid = data.pop("sweep", None)
    where = f"{path}:sweep"
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError(f"{where}: expected a mapping of config keys to lists of values, e.g. "
                          "{preferences.world.majority_share: [0.5, 0.75, 0.91]}, got "
                          f"{'nothing' if grid is None else repr(grid)}")
    for key, values in grid.items():
        if not isinstance(key, str) or not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
    base = from_dict(RunConfig, data, where=f"{path}:")
    points = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        point = data
        for key, value in setting.items():
            point = _set(point, key, value)
        name = _setting_name(setting)
        points.append((name, setting, from_dict(RunConfig, point, where=f"{path}: setting {name}:")))
    return Sweep({k: tuple(v) for k, v in grid.items()}, tuple(points), base)


# What sweep.json keeps of each policy.
SWEEP_FIELDS = ("group_reward", "group_reward_ci", "worst_group_reward", "worst_group_reward_ci",
                "win_rate_vs_reference", "win_rate_vs_single", "kl")


def sweep_entry(name: str, setting: dict[str, Any], report: dict, minority: str | None = None) -> dict:
    """One setting of sweep.json: its keys, group sizes, the minority (`minority`, else the setting's smallest
    group) and the largest other group, each reward model's held-out accuracy per group (the mean over seeds),
    and each policy's per-group reward and win rates (with intervals)."""
    sizes = report.get("group_sizes") or {}
    groups = report["groups"]
    by_size = sorted(groups, key=lambda g: (sizes.get(g, 0), groups.index(g)))
    minority = minority if minority in groups else by_size[0]
    em = report.get("em", {})
    ari = em.get("ari")
    return {"setting": setting, "directory": name, "groups": groups, "group_sizes": sizes,
            "minority": minority, "majority": next(g for g in reversed(by_size) if g != minority), "em_ari": ari,
            "heldout_accuracy": heldout_accuracy(em.get("heldout")),
            "group_reward_correlation": report.get("group_reward_correlation"),
            "group_heads": report.get("group_heads"),
            "policies": {policy: {k: entry[k] for k in SWEEP_FIELDS if k in entry}
                         for policy, entry in report["policies"].items()}}


def heldout_accuracy(heldout: dict | list | None) -> dict | None:
    """{"mixture": {group: accuracy}, "single": {...}} on the held-out pairs of each group's users, from a run's
    `em.heldout` (or the mean over a list of them, one per seed); None when there were no held-out pairs."""
    runs = [h for h in (heldout if isinstance(heldout, list) else [heldout]) if h]
    if not runs:
        return None
    out: dict = {}
    for model in ("mixture", "single"):
        tables = [(h.get(model) or {}).get("accuracy_by_group") for h in runs]
        if tables and all(tables):
            out[model] = {g: sum(t[g] for t in tables) / len(tables) for g in tables[0]
                          if all(g in t for t in tables)}
    return out or None


def sweep_minority(reports: list[dict]) -> str | None:
    """The sweep's minority: the group that is the smallest in the most settings (ties: the smallest in total), so
    that one group is followed across the sweep, its equal-share settings included. None without group sizes."""
    smallest, totals = {}, {}
    for report in reports:
        sizes = report.get("group_sizes") or {}
        if not sizes:
            return None
        low = min(sizes.values())
        for group, size in sizes.items():
            smallest[group] = smallest.get(group, 0) + (size == low and list(sizes.values()).count(low) == 1)
            totals[group] = totals.get(group, 0) + size
    return max(smallest, key=lambda g: (smallest[g], -totals[g])) if smallest else None


def sweep(spec: Sweep, out: str | Path, *, progress: bool = True) -> dict:
    """Run every setting of `spec` (each OUT/SETTING, with its seeds below it), then write sweep.json and
    sweep.png in OUT. A rerun resumes: finished settings are read back. Returns sweep.json's content."""
    from maxmin_jax.evaluation.plots import plot_sweep
    from maxmin_jax.pipeline.runners import run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name, setting, cfg in spec.points:
        if progress:
            print(f"sweep: {name}", flush=True)
        reports.append((name, setting, run(cfg, out / name, progress=progress)))
    minority = sweep_minority([report for _, _, report in reports])
    entries = [sweep_entry(name, setting, report, minority) for name, setting, report in reports]
    result = {"keys": list(spec.grid), "grid": {k: list(v) for k, v in spec.grid.items()},
              "interval_kind": ("Student t across seeds" if spec.base.seeds is not None else
                                "paired bootstrap over the evaluation prompts"),
              "seeds": list(spec.base.seeds) if spec.base.seeds is not None else [spec.base.seed],
              "settings": entries}
    if is_primary():
        write_json_atomic(out / "sweep.json", json.loads(json.dumps(result)))
        plot_sweep(result, out / "sweep.png")
    return result


__all__ = ["Sweep", "heldout_accuracy", "load_sweep", "run_seeds", "seed_config", "sweep", "sweep_entry",
           "sweep_minority"]
