"""The EM zoo table: ARI of our defaults, of the paper's setting and of the oracle on every zoo world, per seed.

    python -m benchmarks.em_zoo --split tune,heldout --seeds 0,1 --out benchmarks/results_em_zoo.json

Each world's rows are fixed by the world; a seed fixes the reward model's initial weights and EM's own randomness.
The reward model is a one-layer GPT-2 (hidden 32, 4 heads) trained from scratch over the zoo's word tokenizer,
as a user's tiny random checkpoint would be. "ours" is `EMConfig(num_groups=K)`; "paper" is `EMConfig.paper(K)`
(hard EM, round-robin start, 10 rounds of 50 steps) with the same optimiser; the oracle assigns each user by the
true rewards (`SyntheticWorld.oracle_ari`; "oracle_group_sizes" weighs each group by its share of the users, as the
mixture does); the fitted oracle ("oracle_fitted", `rewards.fitted_oracle`) by heads on the true rewards fitted on
the true groups without the user, what a correctly specified model could recover from these rows. `--auto` also
runs num_groups="auto" and records the K it chose. `--methods none`: the oracles alone.
Prints a markdown table (the one in docs/em.md) and writes every number, with the command and the machine, to
`--out`. `--reuse-paper` takes the paper's setting's figures from an earlier run where it has them (each reused
figure says where from), so a change to the token-feature start reruns only "ours" there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def run_world(world, seed: int, *, methods: tuple[str, ...], auto: bool, overrides: dict | None = None) -> dict:
    from flax import nnx

    from maxmin_jax.data.batching import tokenize_pairs
    from maxmin_jax.models import GPT2Config
    from maxmin_jax.rewards.em import EMConfig, fit_em
    from maxmin_jax.rewards.fitted_oracle import fitted_oracle_ari
    from maxmin_jax.rewards.scoring import clustering_metrics
    from maxmin_jax.rewards.model import RewardModel

    tok = world.tokenizer()
    rows = world.preference_rows()
    batch = tokenize_pairs(tok, rows, max_length=64)
    config = GPT2Config(vocab_size=len(tok), max_position_embeddings=64, hidden_size=32, num_layers=1, num_heads=4)
    k = world.num_groups
    out = {"oracle": world.oracle_ari(rows), "oracle_group_sizes": world.oracle_ari(rows, group_sizes=True),
           "oracle_fitted": fitted_oracle_ari(world, rows)}
    configs = {"ours": EMConfig(num_groups=k, seed=seed, progress=False, **(overrides or {})),
               "paper": EMConfig.paper(k, seed=seed, progress=False)}
    if auto:
        configs["auto"] = EMConfig(num_groups="auto", seed=seed, progress=False, **(overrides or {}))
    for name, em in configs.items():
        if name not in methods and not (name == "auto" and auto):
            continue
        start = time.perf_counter()
        model = RewardModel.from_config(config, k if em.num_groups != "auto" else 1, nnx.Rngs(seed))
        result = fit_em(model, batch, em)
        out[name] = clustering_metrics(result.assignments, batch.groups)["ari"]
        out[f"{name}_seconds"] = time.perf_counter() - start
        if name == "auto":
            out["auto_k"] = result.num_groups
        if name == "ours":
            out["ours_assigned_by"] = [h["assigned_by"] for h in result.history]
            out["ours_init"] = clustering_metrics(np.array(result.diagnostics["init"]["assignments"]),
                                                  batch.groups)["ari"]
            out["ours_feature_set"] = {k: v for k, v in result.diagnostics["init"]["feature_set"].items()
                                       if k != "scores"}
    return out


def markdown(rows: list[dict], seeds: list[int]) -> str:
    head = ["split", "world", "K", "sizes", "pairs/user", "oracle", "fitted oracle"]
    methods = [m for m in ("ours", "paper") if any(m in run for r in rows for run in r["runs"].values())]
    for s in seeds:
        head += [f"{m} s{s}" for m in methods]
    if any("auto_k" in r["runs"][str(seeds[0])] for r in rows):
        head += ["auto K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        runs = r["runs"]
        cells = [r["split"], r["world"], str(r["K"]), ":".join(map(str, r["sizes"])), str(r["pairs_per_user"]),
                 f"{runs[str(seeds[0])]['oracle']:.2f}", f"{runs[str(seeds[0])]['oracle_fitted']:.2f}"]
        for s in seeds:
            cells += [f"{runs[str(s)].get(m, float('nan')):.2f}" for m in methods]
        if "auto K" in head:
            cells.append("/".join(str(runs[str(s)].get("auto_k", "-")) for s in seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], seeds: list[int], split: str) -> str:
    sel = [r for r in rows if r["split"] == split]
    out = []
    for name in ("ours", "paper"):
        achievable = [r["runs"][str(s)][name] for r in sel for s in seeds
                      if r["runs"][str(s)]["oracle"] >= 0.95 and name in r["runs"][str(s)]]
        every = [r["runs"][str(s)][name] for r in sel for s in seeds if name in r["runs"][str(s)]]
        fitted = [r["runs"][str(s)][name] for r in sel for s in seeds
                  if r["runs"][str(s)]["oracle_fitted"] >= 0.95 and name in r["runs"][str(s)]]
        if every:
            out.append(f"{split} {name}: mean ARI {np.mean(every):.3f} over {len(every)} fits; where the oracle >= "
                       f"0.95: mean {np.mean(achievable):.3f}, ARI >= 0.9 in {np.mean(np.array(achievable) >= 0.9):.0%}"
                       f" of {len(achievable)}; where the fitted oracle >= 0.95: ARI >= 0.9 in "
                       f"{sum(a >= 0.9 for a in fitted)} of {len(fitted)}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.em_zoo", description=__doc__.splitlines()[0])
    p.add_argument("--split", default="tune,heldout", help="comma-separated zoo splits: tune, heldout, test, independent")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default="ours,paper")
    p.add_argument("--auto", action="store_true", help="also run num_groups='auto'")
    p.add_argument("--only", default="", help="comma-separated world indices within each split")
    p.add_argument("--reuse-paper", default="", metavar="JSON",
                   help="take the paper's setting's figures from this earlier results file (a doc of this script, "
                        "or a file of such docs keyed by split) for the worlds and seeds it has, instead of "
                        "rerunning them: that setting does not use the token features, so a change to them leaves "
                        "its figures as they were")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an EMConfig field of 'ours' (and 'auto'), e.g. length_shape=off (repeatable)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    earlier = _earlier_paper_runs(args.reuse_paper) if args.reuse_paper else {}

    from benchmarks import env
    from benchmarks.em_init_zoo import parse_override
    from maxmin_jax.data.zoo import zoo
    from maxmin_jax.rewards.em import EMConfig

    overrides = dict(parse_override(EMConfig, s) for s in args.set)
    environment = env.describe()  # at the start: the commit and load the run began with, not those of its last write

    seeds = [int(s) for s in args.seeds.split(",")]
    only = {int(i) for i in args.only.split(",") if i}
    rows = []
    for split in args.split.split(","):
        for i, world in enumerate(zoo(split)):
            if only and i not in only:
                continue
            runs = {}
            for seed in seeds:
                methods = tuple(args.methods.split(","))
                reused = earlier.get((split, i, world.describe(), str(seed)))
                if reused is not None and "paper" in methods:
                    methods = tuple(m for m in methods if m != "paper")
                runs[str(seed)] = run_world(world, seed, methods=methods, auto=args.auto, overrides=overrides)
                if reused is not None and "paper" not in methods:
                    runs[str(seed)].update(reused)
                print(f"[em_zoo] {split} {i} {world.describe()} seed {seed}: {runs[str(seed)]}", file=sys.stderr,
                      flush=True)
            rows.append({"split": split, "index": i, "world": f"{world.family} #{i}", "description": world.describe(),
                         "K": world.num_groups, "sizes": list(world.group_sizes),
                         "pairs_per_user": world.pairs_per_user, "runs": runs})
            _write(args, argv, environment, seeds, rows)  # after each world: a run stopped early keeps it
    table, notes = _write(args, argv, environment, seeds, rows)
    print(table)
    print(notes)
    return 0


def _earlier_paper_runs(path: str) -> dict:
    """(split, index, description, seed) -> the paper's setting's figures of an earlier run, marked as reused."""
    with open(path) as f:
        loaded = json.load(f)
    docs = [loaded] if "worlds" in loaded else list(loaded.values())
    out = {}
    for doc in docs:
        for row in doc["worlds"]:
            for seed, run in row["runs"].items():
                if "paper" in run:
                    out[row["split"], row["index"], row["description"], seed] = {
                        "paper": run["paper"], "paper_seconds": run["paper_seconds"],
                        "paper_from": f"{doc['command']} ({doc['environment']['date']})"}
    return out


def _write(args, argv, environment: dict, seeds: list[int], rows: list[dict]) -> tuple[str, str]:
    table = markdown(rows, seeds)
    splits = [s for s in args.split.split(",") if any(r["split"] == s for r in rows)]
    notes = "\n".join(summary(rows, seeds, split) for split in splits)
    doc = {"command": " ".join(["python -m benchmarks.em_zoo", *(sys.argv[1:] if argv is None else argv)]),
           "environment": environment, "seeds": seeds, "worlds": rows, "summary": notes, "table": table}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
    return table, notes


if __name__ == "__main__":
    sys.exit(main())
