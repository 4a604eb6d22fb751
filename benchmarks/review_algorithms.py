"""The review world (10:1) with every algorithm: does maxmin lift the minority's true reward above single and
utilitarian of the same algorithm, on the same prompts? And how does the worst group's reward grow with compute?

    python -m benchmarks.review_algorithms --out out/review_algorithms [--quick] [--stages 10 20 30]

One pipeline run (`maxmin_jax.pipeline.run`) of the demo config with policy.algorithms = ppo, grpo, rloo, dpo,
ipo and objectives single, utilitarian, maxmin: SFT, EM and standardisation once, then every (objective,
algorithm) pair from the same start, evaluated on the same 512 prompts by the world's true group rewards
(reference-standardised: 0 is the reference policy, 1 its std). The run is repeated with more iterations
(`--stages`): each rerun continues training from the last checkpoint and evaluates again, which gives the worst
group's reward against compute: sampled response tokens for the online algorithms, optimiser steps offline.

Writes, beside the run directory: review_algorithms.json (figures, the CPU, wall time) and
review_algorithms.png (worst-group reward against compute, one panel per algorithm).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

ALGORITHMS = ("ppo", "grpo", "rloo", "dpo", "ipo")
OBJECTIVES = ("single", "utilitarian", "maxmin")
QUICK = ["preferences.world.num_users=24", "preferences.world.pairs_per_user=8", "model.sft_examples=256",
         "model.sft.steps=20", "rewards.em.rounds=1", "rewards.em.steps_per_round=10", "rewards.single_reward_steps=10",
         "sampling.max_new_tokens=8", "policy.prompt_batch=16", "policy.pair_batch=16",
         "evaluation.standardizer_prompts=32", "evaluation.prompts=32", "evaluation.batch_size=16"]


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute(curve: list[dict], algorithm: str) -> float:
    """Sampled response tokens (online) or optimiser steps (offline) of a training curve."""
    if algorithm in ("dpo", "ipo"):
        return float(len(curve))
    return float(sum(m["sampled_tokens"] for m in curve))


def main(argv=None) -> dict:
    from maxmin_jax.pipeline import load_config, run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/review_algorithms")
    parser.add_argument("--stages", type=int, nargs="+", default=[10, 20, 30], help="iterations at each evaluation")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--quick", action="store_true", help="a tiny world and model (a smoke run, no evidence)")
    parser.add_argument("--set", action="append", default=[], help="config override, as for `maxmin-jax run`")
    args = parser.parse_args(argv)

    out = Path(args.out)
    base = (QUICK if args.quick else []) + [f"policy.algorithms=[{', '.join(args.algorithms)}]",
                                            f"policy.objectives=[{', '.join(OBJECTIVES)}]"] + args.set
    began, stages = time.perf_counter(), []
    for iterations in args.stages:
        cfg = load_config(None, overrides=base + [f"policy.iterations={iterations}",
                                                  f"policy.checkpoint_every={min(args.stages)}"])
        report = run(cfg, out / "run", progress=False)
        entry = {"iterations": iterations, "policies": {}}
        for name, policy in report["policies"].items():
            if name == "reference":
                continue
            entry["policies"][f"{policy['objective']}-{policy['algorithm']}"] = {
                "objective": policy["objective"], "algorithm": policy["algorithm"],
                "group_reward": policy["group_reward"], "worst_group_reward": policy["worst_group_reward"],
                "compute": compute(report["curves"][name], policy["algorithm"])}
        stages.append(entry)
        print(f"{iterations} iterations: {time.perf_counter() - began:.0f} s", flush=True)
    final = stages[-1]["policies"]
    minority = min(report["group_sizes"], key=report["group_sizes"].get)
    verdicts = {}
    for algorithm in args.algorithms:
        get = lambda objective: final[f"{objective}-{algorithm}"]["group_reward"][minority]  # noqa: E731
        verdicts[algorithm] = {"minority": minority, **{o: get(o) for o in OBJECTIVES},
                               "maxmin_lifts_minority": get("maxmin") > max(get("single"), get("utilitarian"))}
    result = {"cpu": cpu_name(), "devices": report["devices"], "seconds": time.perf_counter() - began,
              "ari": report["em"].get("ari"), "group_sizes": report["group_sizes"], "overrides": base,
              "minority": verdicts, "stages": stages}
    (out / "review_algorithms.json").write_text(json.dumps(result, indent=2))
    plot(result, args.algorithms, out / "review_algorithms.png")
    for algorithm, v in verdicts.items():
        print(f"{algorithm}: minority ({minority}) single {v['single']:+.2f}, utilitarian {v['utilitarian']:+.2f}, "
              f"maxmin {v['maxmin']:+.2f}  {'lifted' if v['maxmin_lifts_minority'] else 'NOT lifted'}")
    return result


def plot(result: dict, algorithms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(algorithms), figsize=(3.4 * len(algorithms), 3.2), sharey=True, squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms):
        for objective, style in zip(OBJECTIVES, ("--", "-", "-")):  # dashed: offline single = utilitarian
            name = f"{objective}-{algorithm}"
            xs = [0.0] + [s["policies"][name]["compute"] for s in result["stages"]]
            ys = [0.0] + [s["policies"][name]["worst_group_reward"] for s in result["stages"]]
            ax.plot(xs, ys, style, marker="o", label=objective, zorder=3 if objective == "single" else 2)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(algorithm)
        ax.set_xlabel("optimiser steps" if algorithm in ("dpo", "ipo") else "sampled tokens")
    axes[0][0].set_ylabel("worst group's true reward\n(reference = 0)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
