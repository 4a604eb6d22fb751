"""Reports: report.json, table.txt and PNG figures (matplotlib, headless); the schema is in docs/report.md."""

from __future__ import annotations

import os
from pathlib import Path

from maxmin_jax.evaluation.plots import plot_curves, plot_group_rewards, plot_win_rates
from maxmin_jax.evaluation.table import format_table
from maxmin_jax.strict_json import write_json

FIGURES = {"group_rewards.png": plot_group_rewards, "win_rates.png": plot_win_rates, "curves.png": plot_curves}


def write_report(report: dict, out_dir: str | Path) -> Path:
    """report.json, table.txt, group_rewards.png, win_rates.png and curves.png in `out_dir`.

    Each file replaces its old version whole (written beside it, then renamed), report.json last: a run killed
    while reporting leaves the previous report or none, never a truncated file, and a report.json that is newer
    than its figures never lies about them. report.json is strict JSON (a NaN in it is a bug in whatever produced
    it, named by its path in the document)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, plot in FIGURES.items():
        _replace(out / name, lambda tmp, plot=plot: plot(report, tmp))
    _replace(out / "table.txt", lambda tmp: tmp.write_text(format_table(report) + "\n"))
    write_json(out / "report.json", report)
    return out


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells matplotlib the format
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["FIGURES", "format_table", "plot_curves", "plot_group_rewards", "plot_win_rates", "write_report"]
