"""EM's token-feature start alone on the zoo: ARI of the partition `fit_em` would start from, per world.

    python -m benchmarks.em_init_zoo --split tune,heldout,test --out /tmp/init.json [--set feature_shape=off] [--auto]

In every zoo fit measured so far the reward-model rounds kept the start's partition, so this is the fast loop for
the start's defaults: `rewards.start.feature_start` on each world's tokenized pairs, exactly as `fit_em` calls it
(no held-out split of its own: the features of every pair, the mixture on all of them), at the true K, then the ARI
of the mixture's assignments. `--set name=value` overrides an `EMConfig` field (tuples as comma lists), so a
candidate default is compared with the current one on the same worlds. `--auto`: num_groups="auto" instead of the
true K, recording the K chosen (the start chooses K for `fit_em`). Prints per-world rows and per-split means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np


def parse_override(config_cls, text: str):
    """"field=value" -> (field, value typed as the field's default: tuples from comma lists)."""
    name, value = text.split("=", 1)
    field = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    default = field.default
    if isinstance(default, tuple):
        return name, tuple(int(v) for v in value.split(",") if v)
    if isinstance(default, bool):
        return name, value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return name, int(value)
    if isinstance(default, float):
        return name, float(value)
    return name, value


def run_world(world, overrides: dict, seed: int, auto: bool = False) -> dict:
    """The start's ARI, and each candidate feature set's (so a candidate added to the defaults is measured against
    the choice without it in the same run: "ari_without_<name>" is the ARI of the best candidate whose <name> is
    off ("disputed": whose single tokens are not the most disputed ones), the choice the defaults made before <name>
    was offered)."""
    from maxmin_jax.data.batching import tokenize_pairs
    from maxmin_jax.rewards import start as start_module
    from maxmin_jax.rewards.em import EMConfig
    from maxmin_jax.rewards.scoring import clustering_metrics

    rows = world.preference_rows()
    batch = tokenize_pairs(world.tokenizer(), rows, max_length=64)
    config = EMConfig(num_groups="auto" if auto else world.num_groups, seed=seed, progress=False, **overrides)
    fitted = []  # every mixture feature_start fits, to find each candidate's by its score
    real = start_module.fit_feature_mixture

    def recording(*args, **kwargs):
        fitted.append(real(*args, **kwargs))
        return fitted[-1]

    start_module.fit_feature_mixture = recording
    try:
        start = time.perf_counter()
        _, mixture, _, candidate = start_module.feature_start(batch, batch.num_pairs, batch.user_index,
                                                              batch.num_users, config)
        seconds = time.perf_counter() - start
    finally:
        start_module.fit_feature_mixture = real
    by_score = {f.score: f for f in fitted}
    scores = candidate["scores"]
    for c in scores:  # with --auto a candidate's score is its best K's, fitted inside select_num_groups: no ARI
        if c["leave_one_user_out_log_likelihood"] in by_score:
            c["ari"] = clustering_metrics(by_score[c["leave_one_user_out_log_likelihood"]].assignments,
                                          batch.groups)["ari"]
    out = {"oracle": world.oracle_ari(rows), "oracle_group_sizes": world.oracle_ari(rows, group_sizes=True),
           "ari": clustering_metrics(mixture.assignments, batch.groups)["ari"],
           "seconds": seconds, "chosen": {k: v for k, v in candidate.items() if k != "scores"}, "candidates": scores,
           "k": mixture.num_groups}
    without = {name: (lambda c, name=name: not c[name])
               for name in (*start_module.EXTENSIONS, "prompt_features", "tokens")}
    without["disputed"] = lambda c: c["token_order"] == "frequent"
    without["disputed_bigrams"] = lambda c: c["token_order"] != "disputed_bigrams"
    for name, off in without.items() if not auto else ():
        rest = [c for c in scores if off(c)]
        if rest and len(rest) < len(scores):
            out[f"ari_without_{name}"] = max(rest, key=lambda c: c["held_out_users_log_likelihood"])["ari"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.em_init_zoo", description=__doc__.splitlines()[0])
    p.add_argument("--split", default="tune,heldout,test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="split:index,... (e.g. heldout:2,tune:5); default every world")
    p.add_argument("--set", action="append", default=[], help="EMConfig field=value (repeatable)")
    p.add_argument("--auto", action="store_true", help='num_groups="auto": record the K chosen')
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    from benchmarks import env
    from maxmin_jax.data.zoo import zoo
    from maxmin_jax.rewards.em import EMConfig

    overrides = dict(parse_override(EMConfig, s) for s in args.set)
    environment = env.describe()  # at the start: the commit and load the run began with
    only = {tuple(s.split(":")) for s in args.only.split(",") if s}
    rows = []
    for split in args.split.split(","):
        for i, world in enumerate(zoo(split)):
            if only and (split, str(i)) not in only:
                continue
            r = {"split": split, "index": i, "world": f"{world.family} #{i}", "K": world.num_groups,
                 **run_world(world, overrides, args.seed, args.auto)}
            rows.append(r)
            print(f"{split:8s} {r['world']:14s} K={r['K']} chose {r['k']} oracle {r['oracle']:.2f} ari {r['ari']:.3f} "
                  f"(without length_shape {r.get('ari_without_length_shape', float('nan')):.3f}, without response_ends "
                  f"{r.get('ari_without_response_ends', float('nan')):.3f}, without bigrams "
                  f"{r.get('ari_without_disputed_bigrams', float('nan')):.3f}, without disputed "
                  f"tokens {r.get('ari_without_disputed', float('nan')):.3f}) "
                  f"{r['seconds']:6.1f}s {r['chosen']}", flush=True)
            if args.out:
                _write(args, environment, overrides, rows)
    print(summary(rows, args.auto))
    if args.out:
        _write(args, environment, overrides, rows)
    return 0


def summary(rows: list[dict], auto: bool = False) -> str:
    lines = []
    for split in dict.fromkeys(r["split"] for r in rows):
        sel = [r for r in rows if r["split"] == split]
        for key in ("ari", "ari_without_length_shape", "ari_without_response_ends", "ari_without_disputed_bigrams",
                    "ari_without_disputed"):
            if not all(key in r for r in sel):
                continue
            good = [r[key] for r in sel if r["oracle"] >= 0.95]
            lines.append(f"{split} {key}: mean {np.mean([r[key] for r in sel]):.3f} over {len(sel)} worlds; oracle "
                         f">= 0.95: mean {np.mean(good) if good else float('nan'):.3f}, >= 0.9 in "
                         f"{sum(a >= 0.9 for a in good)}/{len(good)}")
        if auto:
            good = [r for r in sel if r["oracle"] >= 0.95]
            lines.append(f"{split}: K chosen right in {sum(r['k'] == r['K'] for r in sel)}/{len(sel)} worlds, "
                         f"{sum(r['k'] == r['K'] for r in good)}/{len(good)} with oracle >= 0.95")
        lines.append(f"{split}: {sum(r['seconds'] for r in sel):.0f} s of feature_start")
    return "\n".join(lines)


def _write(args, environment: dict, overrides: dict, rows: list[dict]) -> None:
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python -m benchmarks.em_init_zoo", *sys.argv[1:]]), "auto": args.auto,
                   "environment": environment,
                   "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
                   "summary": summary(rows, args.auto), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
