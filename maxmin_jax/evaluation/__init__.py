"""Evaluation: paired bootstrap over prompts, win rates, intervals across seeds, and the report's table and figures.

    stats      bootstrap counts, percentile and Student-t intervals, win indicators
    compare    one run's policies compared per group (rewards, worst group, win rates, paired differences)
    seeds      the reports of several seeds of one config aggregated (means, t intervals, paired tests)
    table      table.txt (and the sweep's table)
    plots      group_rewards.png, win_rates.png, curves.png, sweep.png

The runners over many runs (`seeds:`, `maxmin-jax sweep`) are `maxmin_jax.pipeline.experiments`.
"""

from maxmin_jax.evaluation.compare import compare, gain_shares, single_baselines
from maxmin_jax.evaluation.stats import bootstrap_counts, percentile_interval, t_interval, win_rate, wins

__all__ = ["bootstrap_counts", "compare", "gain_shares", "percentile_interval", "single_baselines", "t_interval",
           "win_rate", "wins"]
