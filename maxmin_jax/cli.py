"""`maxmin-jax` command line: build a run config from a file and flags, call a pipeline runner, print the result.

Errors in what the user gave (`maxmin_jax.errors.InputError`: a config key, a data row, a flag, a checkpoint, an
output directory) are printed as one line naming it, exit status 2; a training run stopped by a numerical fault
(`NumericalFault`: a non-finite or exploding loss, gradient or KL) likewise, exit status 3, its last good checkpoint
kept; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import yaml


# Config from flags ------------------------------------------------------------------------------------------------
def _typed(hint, flag: str):
    """An argparse type: the text read as YAML, then checked against `hint` (errors name the flag)."""
    def parse(text: str):
        from maxmin_jax.config_io import ConfigError, _convert, load_yaml_text

        try:
            value = load_yaml_text(text)
        except yaml.YAMLError:
            value = text
        try:
            return _convert(hint, value, flag)
        except ConfigError as e:  # argparse reports it as "argument --flag: <message>"
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, dest: str, skip: tuple[str, ...] = (),
                     aliases: dict[str, tuple[str, ...]] | None = None, prefix: str = "") -> None:
    """One `--field-name` flag per field of dataclass `cls` (nested dataclasses as `--section-field`), typed by its
    annotation, so a new config field is a new flag with no edit here. Values land in `args.<dest>` as
    {dotted.path: value}, only for flags given."""
    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if path in skip or not f.init:
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            add_config_flags(parser, hint, dest=dest, skip=skip, aliases=aliases, prefix=f"{path}.")
            continue
        flag = "--" + path.replace(".", "-").replace("_", "-")
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        parser.add_argument(flag, *aliases.get(path, ()), dest=f"{dest}:{path}", type=_typed(hint, flag),
                            default=argparse.SUPPRESS, metavar=flag[2:].upper().replace("-", "_"),
                            help=f"{cls.__name__}.{f.name} ({default})")


def config_flags(args: argparse.Namespace, dest: str) -> dict:
    """The values of flags added by `add_config_flags`, as nested data."""
    out: dict = {}
    for key, value in vars(args).items():
        if key.startswith(f"{dest}:"):
            *parents, last = key.split(":", 1)[1].split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return out


def _run_config(path: Path | None, overrides: list[str]):
    from maxmin_jax.pipeline import load_config

    return load_config(path, overrides=overrides)


# Settings named in errors, as this command line takes them ------------------------------------------------------
# The config key behind each flag that is not a config flag (`add_config_flags`' `em:` ones map to rewards.em.*).
_FLAG_KEYS = {
    "fit-rewards": {"skip_invalid": ("preferences.skip_invalid",), "coerce_user_id": ("preferences.coerce_user_id",)},
    "train-policy": {"learning_rate": ("policy.ppo.learning_rate", "policy.critic_free.learning_rate"),
                     "kl_coef": ("policy.ppo.init_kl_coef", "policy.critic_free.kl_coef")},
}
_CONFIG_COMMANDS = ("demo", "run", "sweep")  # a whole config: any key can be set with --set


def flag_spelling(command: str, subparser: argparse.ArgumentParser):
    """`spell` for `errors.render`: a setting an error names (a config key, or `overwrite`) as `command` takes it:
    its flag (`--skip-invalid`, `--learning-rate`), `--set KEY=VALUE` for a fix with a value where the command
    reads a whole config, else None (the message keeps the config key)."""
    flags = {}
    for action in subparser._actions:
        if not action.option_strings:
            continue
        flag = min(action.option_strings, key=len)  # an alias (--learning-rate) over the long form
        keys = (("rewards.em." + action.dest[3:],) if action.dest.startswith("em:")
                else _FLAG_KEYS.get(command, {}).get(action.dest, (action.dest,)))
        for key in keys:
            flags[key] = (flag, action.nargs == 0)

    def spell(option) -> str | None:
        if option.key in flags:
            flag, switch = flags[option.key]
            return flag if switch or option.value is None else f"{flag} {option.value}"
        if command in _CONFIG_COMMANDS and "." in option.key and option.value is not None:
            value = yaml.safe_dump(option.value, default_flow_style=True).strip().removesuffix("\n...")
            return f"--set {option.key}={value}"
        return None  # the config key, as the config file spells it
    return spell


# Commands -----------------------------------------------------------------------------------------------------------
def _algorithms(args) -> list[str]:
    """`--algorithm` flags as an override placed first, so an explicit --set still wins."""
    return [f"policy.algorithms=[{', '.join(args.algorithm)}]"] if args.algorithm else []


def cmd_demo(args) -> int:
    return _run(_run_config(args.config, _algorithms(args) + args.set), args)


def cmd_run(args) -> int:
    return _run(_run_config(Path(args.config), _algorithms(args) + args.set), args)


def _run(cfg, args) -> int:
    from maxmin_jax.config_io import dump_yaml
    from maxmin_jax.pipeline import run
    from maxmin_jax.report import format_table

    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    out = Path(args.out)
    report = run(cfg, out, overwrite=args.overwrite)
    print(format_table(report))
    print(f"({report['group_reward_kind']})")
    if "seeds" in report:  # the aggregate of one run per seed
        print(f"\nseeds {report['seeds']}: EM ARI {report['em']['ari']}, clusters {report['em']['cluster_groups']}")
        print(f"wrote {out / 'report.json'}, {out / 'table.txt'} and plots; each seed's run in {out}/seed-N/")
        return 0
    ari = report["em"].get("ari")
    print(f"\nEM: ARI {'n/a' if ari is None else f'{ari:.3f}'}, mixing weights "
          f"{[round(w, 3) for w in report['em']['weights']]}, clusters {report['em']['cluster_groups']}")
    print(f"wrote {out / 'report.json'}, {out / 'table.txt'}, plots and metrics.jsonl "
          f"({report['timing']['seconds']:.0f} s)")
    return 0


def cmd_sweep(args) -> int:
    from maxmin_jax.config_io import dump_yaml
    from maxmin_jax.evaluation.table import format_sweep
    from maxmin_jax.pipeline.experiments import load_sweep, sweep

    spec = load_sweep(Path(args.config), overrides=args.set)
    if args.print_config:
        for name, _, cfg in spec.points:
            print(f"# setting {name}\n{dump_yaml(cfg)}", end="")
        return 0
    result = sweep(spec, Path(args.out))
    print(format_sweep(result))
    print(f"wrote {Path(args.out) / 'sweep.json'} and sweep.png; each setting's run in {args.out}/SETTING/")
    return 0


def cmd_fit_rewards(args) -> int:
    from maxmin_jax.config_io import from_dict
    from maxmin_jax.errors import ConfigError
    from maxmin_jax.pipeline import FilePreferences, FitRewards, PretrainedModel, RunConfig, fit_rewards
    from maxmin_jax.rewards.diagnostics import fit_warnings
    from maxmin_jax.rewards.em import EMConfig

    flags = {**config_flags(args, "em"), "seed": args.seed}
    if args.paper and flags["num_groups"] == "auto":
        raise ConfigError("--paper: the paper's setting fixes K; give --num-groups an integer", key="num_groups")
    base = EMConfig.paper(flags["num_groups"]) if args.paper else None
    em = from_dict(EMConfig, flags, where="rewards.em", base=base)  # keys as the flags spell
    cfg = RunConfig(seed=args.seed, model=PretrainedModel(policy=args.model),
                    preferences=FilePreferences(files=args.data, skip_invalid=args.skip_invalid,
                                                coerce_user_id=args.coerce_user_id, heldout_fraction=0.0),
                    rewards=FitRewards(em=em, single_reward_steps=0, shared_backbone=not args.separate_backbones))
    result, prefs = fit_rewards(cfg, args.out, overwrite=args.overwrite)
    for message in fit_warnings(result):
        print(f"maxmin-jax fit-rewards: warning: {message}", file=sys.stderr)
    summary = {"users": len(result.user_ids), "num_groups": result.num_groups,
               "weights": [round(float(w), 4) for w in result.weights], "skipped_rows": prefs.info["skipped_rows"],
               **result.metrics}
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'assignments.json'}, em_history.json, em_history.png and reward_model/")
    return 0


def cmd_train_policy(args) -> int:
    from maxmin_jax.generate import SamplingConfig
    from maxmin_jax.pipeline import (EvaluationConfig, LoadRewards, LoraConfig, LoraSpec, PolicyConfig,
                                     PretrainedModel, PromptsConfig, RunConfig, train_policy)
    from maxmin_jax.policy.critic_free import CriticFreeConfig
    from maxmin_jax.policy.ppo import PPOConfig

    batch = args.batch_size
    ppo = PPOConfig(learning_rate=args.learning_rate, init_kl_coef=args.kl_coef, minibatches=2 if batch % 2 == 0 else 1)
    critic_free = CriticFreeConfig(learning_rate=args.learning_rate, kl_coef=args.kl_coef)
    cfg = RunConfig(
        seed=args.seed, preferences=None, model=PretrainedModel(policy=args.model),
        prompts=PromptsConfig(source=args.prompts), rewards=LoadRewards(path=args.rewards),
        lora=LoraConfig(policy=LoraSpec(rank=args.lora_rank)) if args.lora_rank else None,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p),
        policy=PolicyConfig(objectives=(args.objective,), algorithms=(args.algorithm,), ppo=ppo,
                            critic_free=critic_free, iterations=args.iterations, prompt_batch=batch,
                            checkpoint_every=args.checkpoint_every, softmin_temperature=args.softmin_temperature,
                            dro_step_size=args.dro_step_size),
        evaluation=EvaluationConfig(standardizer_prompts=4 * batch, prompts=batch, batch_size=batch))
    curves = train_policy(cfg, args.out, overwrite=args.overwrite)
    last = curves[args.objective][-1]
    exported = Path(args.out) / "policies" / args.objective
    kl = f"{last['kl']:.3f}" if "kl" in last else "n/a (kl_coef 0)"
    print(f"final: score {last['score']:.3f}, KL {kl}; wrote {exported}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from maxmin_jax.pipeline.config import ALGORITHMS
    from maxmin_jax.policy.objectives import OBJECTIVES
    from maxmin_jax.rewards.em import EMConfig

    parser = argparse.ArgumentParser(prog="maxmin-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def runner(p):
        p.add_argument("--algorithm", action="append", choices=list(ALGORITHMS), default=[],
                       help="train with this algorithm (repeatable; default: the config's, ppo for the demo): ppo, "
                            "grpo / rloo (critic-free), dpo / ipo (offline, on the run's preference pairs)")
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one config value (YAML), e.g. --set policy.iterations=10; repeatable")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        overwrite(p)

    def overwrite(p):
        p.add_argument("--overwrite", action="store_true",
                       help="delete what a previous run wrote in --out and start afresh (a rerun of the same command "
                            "resumes without it; another config or other inputs are refused)")

    demo = sub.add_parser("demo", help="the review world end to end: SFT, EM, a policy per objective, report")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--config", type=Path, default=None, help="a config file over the demo defaults")
    runner(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run a config file (YAML; keys not given keep the demo defaults)")
    run.add_argument("config")
    run.add_argument("--out", default="out/run")
    runner(run)
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", help="run a config over a grid of settings (its `sweep:` key): sweep.json, plot")
    sweep.add_argument("config")
    sweep.add_argument("--out", default="out/sweep")
    runner(sweep)
    sweep.set_defaults(func=cmd_sweep)

    fit = sub.add_parser("fit-rewards", help="EM mixture of K reward models from preference rows")
    fit.add_argument("--data", required=True, help="jsonl/json/parquet/csv with user_id, prompt, chosen, rejected")
    fit.add_argument("--model", required=True, help="HF checkpoint directory or hub id (backbone + tokenizer)")
    fit.add_argument("--out", required=True)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--paper", action="store_true",
                     help="the paper's EM setting (EMConfig.paper: hard EM from a round-robin start, fixed rounds "
                          "and steps); other EM flags override it")
    fit.add_argument("--separate-backbones", action="store_true", help="K backbones (the paper) instead of K heads")
    fit.add_argument("--skip-invalid", action="store_true", help="skip bad rows (counted and reported)")
    fit.add_argument("--coerce-user-id", action="store_true", help="accept numeric user ids as strings")
    add_config_flags(fit, EMConfig, dest="em", skip=("seed", "progress"),
                     aliases={"steps_per_round": ("--steps",), "m_step.learning_rate": ("--learning-rate",)})
    for action in fit._actions:
        if action.dest == "em:num_groups":
            action.required = True
    overwrite(fit)
    fit.set_defaults(func=cmd_fit_rewards)

    train = sub.add_parser("train-policy", help="RL (PPO, GRPO, RLOO) on a fitted reward mixture with a "
                                                "social-choice objective")
    train.add_argument("--model", required=True, help="policy/reference HF checkpoint directory or hub id")
    train.add_argument("--rewards", required=True, help="fit-rewards output directory")
    train.add_argument("--prompts", required=True, help="text file, one prompt per line, or a table with 'prompt'")
    train.add_argument("--objective", default="maxmin", choices=list(OBJECTIVES))
    train.add_argument("--algorithm", default="ppo", choices=["ppo", "grpo", "rloo"],
                       help="ppo, or critic-free grpo / rloo (the learning rate and KL weight apply to each)")
    train.add_argument("--out", required=True)
    train.add_argument("--iterations", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-new-tokens", type=int, default=32)
    train.add_argument("--temperature", type=float, default=1.0)
    train.add_argument("--top-k", type=int, default=None)
    train.add_argument("--top-p", type=float, default=None)
    train.add_argument("--learning-rate", type=float, default=1e-5)
    train.add_argument("--kl-coef", type=float, default=0.05)
    train.add_argument("--softmin-temperature", type=float, default=0.5)
    train.add_argument("--dro-step-size", type=float, default=0.5)
    train.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    train.add_argument("--checkpoint-every", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    overwrite(train)
    train.set_defaults(func=cmd_train_policy)
    for command, subparser in sub.choices.items():
        subparser.set_defaults(spell=flag_spelling(command, subparser))
    return parser


def main(argv: list[str] | None = None) -> int:
    from maxmin_jax.errors import InputError, NumericalFault, render

    args = build_parser().parse_args(argv)
    from maxmin_jax.distributed import initialize

    initialize()  # joins a multi-host run when the cluster environment describes one; no-op on one host
    try:
        return args.func(args)
    except (InputError, NumericalFault) as e:
        kind, code = ("error", 2) if isinstance(e, InputError) else ("numerical fault", 3)
        print(f"maxmin-jax {args.command}: {kind}: {render(e, args.spell)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
