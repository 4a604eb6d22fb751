"""Reports: report.json, table.txt and PNG figures (matplotlib, headless); the schema is in docs/report.md."""

from __future__ import annotations

import json
from pathlib import Path

from maxmin_jax.evaluation.plots import plot_curves, plot_group_rewards, plot_win_rates
from maxmin_jax.evaluation.table import format_table

FIGURES = {"group_rewards.png": plot_group_rewards, "win_rates.png": plot_win_rates, "curves.png": plot_curves}


def write_report(report: dict, out_dir: str | Path) -> Path:
    """report.json, table.txt, group_rewards.png, win_rates.png and curves.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for name, plot in FIGURES.items():
        plot(report, out / name)
    (out / "table.txt").write_text(format_table(report) + "\n")
    return out


__all__ = ["FIGURES", "format_table", "plot_curves", "plot_group_rewards", "plot_win_rates", "write_report"]
