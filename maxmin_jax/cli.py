"""`maxmin-jax` command line: parse arguments and config files, call the library, print and write results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _experiment_config(path: Path | None):
    from maxmin_jax.config_io import load_yaml
    from maxmin_jax.experiment import ExperimentConfig

    if path is None:
        # The embedded default: the demo config shipped with the repository, else the dataclass defaults.
        return load_yaml(ExperimentConfig, DEMO_CONFIG) if DEMO_CONFIG.exists() else ExperimentConfig()
    return load_yaml(ExperimentConfig, path)


def cmd_demo(args) -> int:
    return _run_experiment(_experiment_config(args.config), Path(args.out))


def cmd_run(args) -> int:
    from maxmin_jax.pretrained_experiment import is_pretrained_config, run_config_file

    if is_pretrained_config(args.config):  # `experiment: pretrained`: HF models and preference files
        return run_config_file(args.config, args.out)
    return _run_experiment(_experiment_config(Path(args.config)), Path(args.out))


def _run_experiment(config, out: Path) -> int:
    from maxmin_jax.experiment import run_experiment
    from maxmin_jax.report import format_table

    report = run_experiment(config, out)
    print(format_table(report))
    print(f"\nEM: ARI {report['em']['ari']:.3f}, mixing weights {[round(w, 3) for w in report['em']['weights']]}")
    print(f"wrote {out / 'report.json'}, {out / 'group_rewards.png'}, {out / 'curves.png'} "
          f"({report['seconds']:.0f} s)")
    return 0


def cmd_fit_rewards(args) -> int:
    from maxmin_jax.data.loaders import load_preferences
    from maxmin_jax.rewards.fit import fit_rewards

    rows = load_preferences(args.data, skip_invalid=args.skip_invalid, coerce_user_id=args.coerce_user_id)
    result = fit_rewards(rows.rows, model_path_or_config=args.model, num_groups=args.num_groups,
                         method=args.method, init=args.init, restarts=args.restarts, seed=args.seed,
                         rounds=args.rounds, steps_per_round=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, shared_backbone=not args.separate_backbones,
                         out_dir=args.out)
    summary = {"users": len(result.user_ids), "weights": [round(float(w), 4) for w in result.weights],
               "skipped_rows": len(rows.skipped), **{k: v for k, v in result.metrics.items()}}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'assignments.json'}, em_history.json and reward_model/")
    return 0


def cmd_train_policy(args) -> int:
    from maxmin_jax.policy.train_cli import train_policy

    train_policy(model=args.model, rewards=args.rewards, prompts=args.prompts, objective=args.objective,
                 out=args.out, iterations=args.iterations, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, learning_rate=args.learning_rate, kl_coef=args.kl_coef,
                 seed=args.seed, lora_rank=args.lora_rank)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxmin-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="review world end to end: SFT, EM, PPO per objective, report")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--config", type=Path, default=None, help="override the embedded configs/demo.yaml")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run an experiment config (YAML)")
    run.add_argument("config")
    run.add_argument("--out", default="out/run")
    run.set_defaults(func=cmd_run)

    fit = sub.add_parser("fit-rewards", help="EM mixture of K reward models from preference rows")
    fit.add_argument("--data", required=True, help="jsonl/json/parquet/csv with user_id, prompt, chosen, rejected")
    fit.add_argument("--model", required=True, help="HF checkpoint directory or hub id (backbone + tokenizer)")
    fit.add_argument("--num-groups", type=int, required=True)
    fit.add_argument("--out", required=True)
    fit.add_argument("--method", choices=["hard", "soft"], default="hard")
    fit.add_argument("--init", choices=["round_robin", "random"], default="round_robin")
    fit.add_argument("--restarts", type=int, default=1)
    fit.add_argument("--rounds", type=int, default=10)
    fit.add_argument("--steps", type=int, default=50, help="optimiser steps per M-step")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--learning-rate", type=float, default=1e-4)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--separate-backbones", action="store_true", help="K backbones (the paper) instead of K heads")
    fit.add_argument("--skip-invalid", action="store_true", help="skip bad rows (counted and reported)")
    fit.add_argument("--coerce-user-id", action="store_true", help="accept numeric user ids as strings")
    fit.set_defaults(func=cmd_fit_rewards)

    train = sub.add_parser("train-policy", help="PPO on a fitted reward mixture with a social-choice objective")
    train.add_argument("--model", required=True, help="policy/reference HF checkpoint directory or hub id")
    train.add_argument("--rewards", required=True, help="fit-rewards output directory")
    train.add_argument("--prompts", required=True, help="text file, one prompt per line, or jsonl with 'prompt'")
    train.add_argument("--objective", default="maxmin",
                       choices=["single", "utilitarian", "maxmin", "maxmin_sample", "softmin", "dro"])
    train.add_argument("--out", required=True)
    train.add_argument("--iterations", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-new-tokens", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=1e-5)
    train.add_argument("--kl-coef", type=float, default=0.05)
    train.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train_policy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maxmin_jax.distributed import initialize

    initialize()  # joins a multi-host run when the cluster environment describes one; no-op on one host
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # our errors name the file/row/key: show them, not a traceback
        print(f"maxmin-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
