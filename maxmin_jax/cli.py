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


def _num_groups(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {k}")
    return k


# fit-rewards flags that map one to one onto EMConfig fields; unset flags keep EMConfig's defaults.
_EM_FLAGS = {"method": "method", "init": "init", "assign_by": "assign_by", "restarts": "restarts",
             "rounds": "rounds", "steps": "steps_per_round", "epochs_per_round": "epochs_per_round",
             "batch_size": "batch_size", "seed": "seed", "k_range": "k_range"}


def cmd_fit_rewards(args) -> int:
    import warnings

    from maxmin_jax.data.loaders import load_preferences
    from maxmin_jax.rewards.em import EMConfig
    from maxmin_jax.rewards.fit import fit_rewards
    from maxmin_jax.rewards.mstep import MStepConfig

    rows = load_preferences(args.data, skip_invalid=args.skip_invalid, coerce_user_id=args.coerce_user_id)
    options = {field: getattr(args, flag) for flag, field in _EM_FLAGS.items() if getattr(args, flag) is not None}
    if options.get("k_range") is not None:
        options["k_range"] = tuple(options["k_range"])
    m_step = MStepConfig() if args.learning_rate is None else MStepConfig(learning_rate=args.learning_rate)
    if args.paper:
        if args.num_groups == "auto":
            raise ValueError("--paper fixes K as the paper does: give --num-groups an integer")
        config = EMConfig.paper(args.num_groups, m_step=m_step, **options)
    else:
        config = EMConfig(num_groups=args.num_groups, m_step=m_step, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_rewards(rows.rows, model_path_or_config=args.model, config=config,
                             shared_backbone=not args.separate_backbones, out_dir=args.out)
    for w in caught:
        print(f"maxmin-jax fit-rewards: warning: {w.message}", file=sys.stderr)
    summary = {"users": len(result.user_ids), "num_groups": result.num_groups,
               "weights": [round(float(w), 4) for w in result.weights], "skipped_rows": len(rows.skipped),
               **{k: v for k, v in result.metrics.items()}}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'assignments.json'}, em_history.json, em_history.png and reward_model/")
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
    fit.add_argument("--num-groups", type=_num_groups, required=True, help="K, or 'auto' to choose it")
    fit.add_argument("--out", required=True)
    fit.add_argument("--k-range", type=int, nargs=2, metavar=("LO", "HI"), help="K tried by --num-groups auto")
    fit.add_argument("--paper", action="store_true",
                     help="the paper's setting: hard EM from a round-robin start, fixed rounds and steps")
    fit.add_argument("--method", choices=["hard", "soft"])
    fit.add_argument("--init", choices=["features", "round_robin", "random"])
    fit.add_argument("--assign-by", choices=["heldout", "reward_model"])
    fit.add_argument("--restarts", type=int)
    fit.add_argument("--rounds", type=int)
    fit.add_argument("--steps", type=int, help="optimiser steps per M-step (default: --epochs-per-round)")
    fit.add_argument("--epochs-per-round", type=float, help="M-step length in passes over the pairs")
    fit.add_argument("--batch-size", type=int)
    fit.add_argument("--learning-rate", type=float)
    fit.add_argument("--seed", type=int)
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
