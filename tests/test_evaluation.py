"""Evaluation statistics on constructed data (no model): the bootstrap interval of a win rate covers the known rate
at the nominal level, paired comparisons and seed aggregation, the report's table, and sweep files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from maxmin_jax.errors import ConfigError, RunDirError
from maxmin_jax.evaluation.compare import compare, gain_shares, single_baselines
from maxmin_jax.evaluation.seeds import aggregate
from maxmin_jax.evaluation.stats import (bootstrap_counts, percentile_interval, resampled_means, t_interval,
                                         win_rate, wins)
from maxmin_jax.evaluation.table import format_table

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_covers_a_known_win_rate_at_the_nominal_rate():
    """200 datasets of 512 prompts where the policy wins with p 0.45, ties with p 0.2 (true win rate 0.55): the 95%
    interval holds 0.55 in 95% of them, within three binomial standard deviations, and is as wide as the normal
    theory says (so the coverage is not bought with wide intervals)."""
    rng = np.random.default_rng(0)
    datasets, n, truth = 200, 512, 0.55
    covered, widths = 0, []
    for d in range(datasets):
        u = rng.random((n, 1))
        ours = np.where(u < 0.45, 1.0, np.where(u < 0.65, 0.5, 0.0))  # tie where both score 0.5
        rate, interval = win_rate(ours, np.full_like(ours, 0.5), bootstrap_counts(n, 500, seed=d))
        covered += interval[0, 0] <= truth <= interval[0, 1]
        widths.append(interval[0, 1] - interval[0, 0])
    coverage = covered / datasets
    tolerance = 3 * math.sqrt(0.95 * 0.05 / datasets)
    assert abs(coverage - 0.95) <= tolerance, coverage
    variance = 0.45 + 0.2 * 0.25 - truth ** 2
    assert np.mean(widths) == pytest.approx(2 * 1.96 * math.sqrt(variance / n), rel=0.05)


def test_bootstrap_counts_resample_with_replacement():
    counts = bootstrap_counts(50, 300, seed=1)
    assert counts.shape == (300, 50) and np.all(counts.sum(1) == 50)
    assert np.array_equal(counts, bootstrap_counts(50, 300, seed=1))  # seeded
    assert counts.max() > 1 and (counts == 0).any()  # with replacement: repeats and omissions
    values = np.arange(50.0)
    np.testing.assert_allclose(resampled_means(values, counts), counts @ values / 50, rtol=1e-6)
    assert np.ptp(percentile_interval(resampled_means(np.ones(50), counts))) == 0


def test_wins_count_ties_half():
    np.testing.assert_array_equal(wins([[1.0, 2.0, 3.0]], [[0.0, 2.0, 4.0]]), [[1.0, 0.5, 0.0]])


def test_t_interval_matches_scipy():
    values = np.array([[0.2, 1.0], [0.5, 1.2], [0.1, 0.7]])
    mean, interval = t_interval(values)
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=values.mean(0), scale=scipy_stats.sem(values, axis=0))
    np.testing.assert_allclose(interval, np.stack([lo, hi], -1), rtol=1e-9)
    assert np.isnan(t_interval(values[:1])[1]).all()


def constructed_scores(n=512, seed=0):
    """Reference; `better` is the reference plus 1 for group a (group b unchanged); `twin` equals `better` up to
    tiny noise; `single` serves a and hurts b."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 2))
    better = ref + np.array([1.0, 0.0])
    twin = better + rng.normal(scale=1e-3, size=(n, 2))
    single = ref + np.array([2.0, -0.5])
    return {"reference": ref, "better": better, "twin": twin, "single": single}


def test_compare_reports_rewards_win_rates_and_paired_differences():
    scores = constructed_scores()
    ref_std = scores["reference"].std(0)
    result = compare(scores, ["a", "b"], single={"better": "single", "twin": "single", "single": "single"},
                     resamples=500)
    better = result["policies"]["better"]
    assert better["group_reward_ci"]["a"][0] == pytest.approx(better["group_reward_ci"]["a"][1])  # a constant shift
    assert better["group_reward_ci"]["a"][0] == pytest.approx(1 / ref_std[0])
    assert better["win_rate_vs_reference"]["a"] == {"rate": 1.0, "ci": [1.0, 1.0]}
    assert better["win_rate_vs_reference"]["b"]["rate"] == 0.5  # every prompt a tie
    assert better["win_rate_vs_single"]["a"]["rate"] == 0.0 and better["win_rate_vs_single"]["b"]["rate"] == 1.0
    assert result["policies"]["single"]["win_rate_vs_single"] is None  # not against itself
    assert result["policies"]["reference"]["win_rate_vs_reference"] is None
    assert better["gain_share"] == {"a": 1.0, "b": 0.0}
    single = result["policies"]["single"]
    shares = gain_shares([2 / ref_std[0], -0.5 / ref_std[1]])
    assert single["gain_share"] == pytest.approx(dict(zip("ab", shares)))
    assert single["worst_group_reward_ci"][1] < 0 < better["worst_group_reward_ci"][0] + 1e-9
    assert single["best_worst_gap"] == pytest.approx(2 / ref_std[0] + 0.5 / ref_std[1])
    worst = result["comparisons"]["worst_group_reward"]
    assert worst["better"]["single"]["significant"] and worst["better"]["single"]["difference"] > 0
    assert not result["comparisons"]["group_reward"]["a"]["better"]["twin"]["significant"]  # noise only
    matrix = result["win_rates"]["a"]
    assert matrix["single"]["better"]["rate"] == 1.0 and matrix["better"]["single"]["rate"] == 0.0
    with pytest.raises(ValueError, match="reference"):
        compare({"x": scores["better"]}, ["a", "b"])
    with pytest.raises(ValueError, match="expected"):
        compare({**scores, "bad": scores["better"][:, :1]}, ["a", "b"])


def test_single_baselines_pair_by_algorithm():
    policies = {"single-ppo": ("single", "ppo"), "maxmin-ppo": ("maxmin", "ppo"), "single-rloo": ("single", "rloo"),
                "maxmin-rloo": ("maxmin", "rloo"), "maxmin-dpo": ("maxmin", "dpo")}
    assert single_baselines(policies) == {"single-ppo": "single-ppo", "maxmin-ppo": "single-ppo",
                                          "single-rloo": "single-rloo", "maxmin-rloo": "single-rloo",
                                          "maxmin-dpo": "single-ppo"}
    assert single_baselines({"maxmin": ("maxmin", "ppo")}) == {"maxmin": None}


def seed_report(seed: int, offset: float, flip: bool = False) -> dict:
    """A run's report where `maxmin` beats `single` on the worst group by 0.3 in every seed (or, with `flip`, by
    +-0.3 alternately), on top of a seed-level offset much larger than that."""
    gap = 0.3 * (-1) ** seed if flip else 0.3
    result = compare({"reference": np.zeros((64, 2)), "single": np.zeros((64, 2)), "maxmin": np.ones((64, 2))},
                     ["a", "b"], single={"maxmin": "single"}, resamples=200)
    policies = {
        "reference": {"group_reward": {"a": 0.0, "b": 0.0}, "worst_group_reward": 0.0},
        "single": {"objective": "single", "group_reward": {"a": 1.0 + offset, "b": offset},
                   "worst_group_reward": offset, "kl": 1.0},
        "maxmin": {"objective": "maxmin", "group_reward": {"a": 0.5 + offset + gap, "b": offset + gap},
                   "worst_group_reward": offset + gap, "kl": 2.0,
                   "win_rate_vs_single": {"a": {"rate": 0.6 + 0.01 * seed, "ci": [0, 1]},
                                          "b": {"rate": 0.7, "ci": [0, 1]}}},
    }
    for name in policies:
        policies[name].setdefault("win_rate_vs_single", None)
    return {"groups": ["a", "b"], "group_sizes": {"a": 10, "b": 1}, "policies": policies,
            "win_rates": result["win_rates"], "em": {"ari": 1.0, "cluster_groups": ["a", "b"]}, "curves": {}}


def test_seed_aggregate_is_a_paired_t_test_across_seeds():
    offsets = [0.0, 2.0, -1.5]
    consistent = aggregate({s: seed_report(s, o) for s, o in enumerate(offsets)})
    maxmin = consistent["policies"]["maxmin"]
    assert maxmin["worst_group_reward"] == pytest.approx(np.mean(offsets) + 0.3)
    lo, hi = maxmin["worst_group_reward_ci"]
    assert lo < 0 < hi  # each policy's own interval is wide: the seeds differ a lot
    pair = consistent["comparisons"]["worst_group_reward"]["single"]["maxmin"]
    assert pair["difference"] == pytest.approx(-0.3) and pair["significant"]  # ... but the paired gap is constant
    assert pair["per_seed"] == pytest.approx([-0.3] * 3)
    assert maxmin["win_rate_vs_single"]["a"]["rate"] == pytest.approx(0.61)
    assert maxmin["win_rate_vs_single"]["a"]["per_seed"] == [0.6, 0.61, 0.62]
    assert consistent["policies"]["single"]["win_rate_vs_single"] is None
    flipped = aggregate({s: seed_report(s, o, flip=True) for s, o in enumerate(offsets)})
    assert not flipped["comparisons"]["worst_group_reward"]["single"]["maxmin"]["significant"]
    table = format_table(consistent)
    assert "maxmin" in table and "Student t over 3 seeds" in table
    with pytest.raises(ValueError, match="at least 2"):
        aggregate({0: seed_report(0, 0.0)})


def test_table_marks_the_best_worst_group_and_its_ties():
    report = {"groups": ["a", "b"], "policies": {}, "comparisons": {"worst_group_reward": {}}}
    for name, worst in (("reference", 0.0), ("x", 0.5), ("y", 0.45), ("z", 0.1)):
        report["policies"][name] = {"group_reward": {"a": worst, "b": worst + 1}, "worst_group_reward": worst,
                                    "kl": 0.0, "response_length": 1.0}
    report["comparisons"]["worst_group_reward"] = {"x": {"y": {"significant": False}, "z": {"significant": True},
                                                         "reference": {"significant": True}}}
    rows = {line.split()[0]: line for line in format_table(report).splitlines()[3:7]}
    assert rows["x"].count("*") == 1 and "=" in rows["y"] and "=" not in rows["z"] and "*" not in rows["z"]


def test_a_report_is_replaced_whole_and_a_nan_in_it_is_refused(tmp_path):
    from maxmin_jax.pipeline import load_config
    from maxmin_jax.report import FIGURES, write_report
    from maxmin_jax.strict_json import NonFiniteJSONError

    report = fake_run_report(load_config())
    write_report(report, tmp_path)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(written) == {"report.json", "table.txt", *FIGURES}
    assert json.loads(written["report.json"]) == json.loads(json.dumps(report))
    report["policies"]["maxmin"]["group_reward"]["concise"] = float("nan")
    with pytest.raises(NonFiniteJSONError, match=r"policies\.maxmin\.group_reward\.concise"):
        write_report(report, tmp_path)
    assert (tmp_path / "report.json").read_bytes() == written["report.json"]  # the last good report stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no temporary files left behind


def test_head_check_flags_a_group_its_head_cannot_protect():
    from maxmin_jax.evaluation.heads import group_heads, wilson_interval

    lo, hi = wilson_interval(7, 9)  # 7 of 9: the Wilson 95% interval, by its formula
    z = scipy_stats.norm.ppf(0.975)
    centre = (7 / 9 + z * z / 18) / (1 + z * z / 9)
    half = z * math.sqrt(7 / 9 * 2 / 9 / 9 + z * z / 324) / (1 + z * z / 9)
    assert (lo, hi) == pytest.approx((centre - half, centre + half)) and lo < 0.5
    heads = group_heads(["positive", "concise", "terse", "silent"],
                        heldout={"accuracy_by_group": {"positive": 0.93, "concise": 5 / 9, "terse": 0.7}},
                        heldout_pairs={"positive": 300, "concise": 9, "terse": 40}, users={"positive": 100},
                        cluster_groups=["positive", "concise", "silent"])
    assert [heads[g]["status"] for g in heads] == ["ok", "near_chance", "no_own_head", "no_heldout_pairs"]
    assert heads["positive"]["reason"] is None and heads["positive"]["accuracy_ci"][0] > 0.89
    assert "56% of its 9 held-out pairs" in heads["concise"]["reason"]
    # A head right on 7 of 9 still cannot be told from chance: too few pairs.
    few = group_heads(["g"], heldout={"accuracy_by_group": {"g": 7 / 9}}, heldout_pairs={"g": 9}, users=None,
                      cluster_groups=None)["g"]
    assert few["status"] == "near_chance" and "too few pairs" in few["reason"]
    report = {"groups": ["positive", "concise"], "group_heads": heads, "policies": {"reference": {
        "group_reward": {"positive": 0.0, "concise": 0.0}, "worst_group_reward": 0.0, "kl": 0.0,
        "response_length": 1.0}}}
    table = format_table(report)
    assert "! concise: concise's reward head is right on 56%" in table and "! positive" not in table


def fake_run_report(cfg, seed_offset: float = 0.0) -> dict:
    """The report a run of `cfg` (a review world) would give, from constructed per-prompt rewards: `single` serves
    the majority and loses the minority more the smaller it is; `maxmin` holds both groups up."""
    world = cfg.preferences.world.build()
    sizes = dict(zip(world.group_names, world.group_sizes))
    minority_share = min(world.group_sizes) / sum(world.group_sizes)
    rng = np.random.default_rng(cfg.seed)
    ref = rng.normal(size=(128, 2))
    scores = {"reference": ref, "single": ref + [1.5, 2.0 * minority_share - 0.8 + seed_offset],
              "maxmin": ref + [0.6, 0.7 + seed_offset]}
    result = compare(scores, list(sizes), single={"single": "single", "maxmin": "single"}, resamples=200)
    policies = result.pop("policies")
    for name, s in scores.items():
        point = (s - ref).mean(0) / ref.std(0)
        policies[name].update(group_reward=dict(zip(sizes, point.tolist())), worst_group_reward=float(point.min()),
                              kl=0.0 if name == "reference" else 1.0, response_length=5.0)
    curves = {n: [{"score": 0.1 * i, "kl": 0.01 * i, "group_reward_std": [0.1 * i, 0.05 * i]} for i in range(3)]
              for n in ("single", "maxmin")}
    from maxmin_jax.evaluation.heads import group_heads

    # The minority's held-out pairs shrink with it (16 pairs a user, a fifth held out); its head is right on 75%.
    heldout_pairs = {g: round(3.2 * n) for g, n in sizes.items()}
    heads = group_heads(list(sizes), heldout={"accuracy_by_group": {g: 0.75 for g in sizes}},
                        heldout_pairs=heldout_pairs, users=sizes, cluster_groups=list(sizes))
    return {"groups": list(sizes), "group_sizes": sizes, "group_reward_kind": "true: constructed",
            "group_heads": heads, "interval_kind": "paired percentile bootstrap", **result, "policies": policies,
            "em": {"ari": 1.0, "cluster_groups": list(sizes)}, "curves": curves}


@pytest.fixture
def fake_runs(monkeypatch):
    """`pipeline.runners.run` replaced by `fake_run_report` (its configs recorded): the runners over many runs,
    without training anything."""
    from maxmin_jax.pipeline import runners

    calls = []

    def run(cfg, out, *, progress=True, overwrite=False):
        if cfg.seeds is not None:
            from maxmin_jax.pipeline.experiments import run_seeds

            return run_seeds(cfg, out, progress=progress, overwrite=overwrite)
        calls.append((cfg, Path(out)))
        return fake_run_report(cfg, seed_offset=0.1 * cfg.seed)

    monkeypatch.setattr(runners, "run", run)
    return calls


def test_sweep_runs_every_setting_and_writes_sweep_json_and_plot(tmp_path, fake_runs):
    from maxmin_jax.evaluation.table import format_sweep
    from maxmin_jax.pipeline.experiments import load_sweep, sweep

    spec = load_sweep(ROOT / "configs" / "sweep_review.yaml", overrides=["seeds=null"])
    assert [name for name, _, _ in spec.points][:2] == ["majority_share=0.5,distance=1",
                                                       "majority_share=0.5,distance=0.5"]
    assert len(spec.points) == 8
    result = sweep(spec, tmp_path, progress=False)
    assert [c.preferences.world.options["majority_share"] for c, _ in fake_runs] == [0.5] * 2 + [0.75] * 2 + \
        [0.9091] * 2 + [0.9677] * 2
    assert [out.name for _, out in fake_runs] == [name for name, _, _ in spec.points]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved == result and (tmp_path / "sweep.png").stat().st_size > 10_000
    minority = [(e["group_sizes"][e["minority"]], e["policies"]["single"]["group_reward"][e["minority"]])
                for e in saved["settings"][::2]]
    assert [size for size, _ in minority] == [55, 28, 10, 4]
    assert {e["minority"] for e in saved["settings"]} == {"concise"}  # one group followed, at 1:1 too
    rewards = [r for _, r in minority]
    assert rewards == sorted(rewards, reverse=True)  # the trend the fake runs hold reaches sweep.json in order
    entry = saved["settings"][0]["policies"]["maxmin"]
    assert set(entry["win_rate_vs_single"]) == {"positive", "concise"} and "worst_group_reward_ci" in entry
    table = format_sweep(result)
    assert len(table.splitlines()) == 2 + 1 + 8 and "single minority" in table
    # 75% right on 13 held-out pairs (4 users) cannot be told from chance; on 32 (10 users) it can.
    heads = [e["group_heads"]["concise"]["status"] for e in saved["settings"][::2]]
    assert heads == ["ok", "ok", "ok", "near_chance"]
    assert [line.split()[4] for line in table.splitlines()[3::2]] == ["ok", "ok", "ok", "chance"]


def test_setting_names_are_plain_directory_names(tmp_path):
    from maxmin_jax.pipeline.experiments import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("preferences: {world: {name: planted, num_groups: 2, group_sizes: [1, 1]}}\n"
                    "sweep: {preferences.world.group_sizes: [[1, 1], [9, 1]], model.sft.learning_rate: [0.003]}\n")
    assert [name for name, _, _ in load_sweep(path).points] == ["group_sizes=1_1,learning_rate=0.003",
                                                                "group_sizes=9_1,learning_rate=0.003"]


def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, fake_runs):
    from maxmin_jax.pipeline.experiments import load_sweep

    path = tmp_path / "sweep.yaml"
    for text, message in (("policy: {iterations: 2}\n", r"sweep\.yaml:sweep: expected a mapping"),
                          ("sweep: {policy.iterations: 3}\n", r"sweep\.yaml:sweep\.policy\.iterations: expected a "
                                                              r"non-empty list"),
                          ("sweep: {preferences.world.majority_share: [0.5, 1.5]}\n",
                           r"setting majority_share=1\.5:.*majority_share must be in \(0, 1\)"),
                          ("sweep: {policy.iteratons: [1]}\n", r"setting iteratons=1:.*policy\.iteratons")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_sweep(path)
    assert fake_runs == []


def test_seeds_run_the_pipeline_per_seed_and_write_the_aggregate(tmp_path, fake_runs):
    from maxmin_jax.pipeline import load_config
    from maxmin_jax.pipeline.runners import run

    cfg = load_config(None, overrides=["seeds=[3, 5, 8]"])
    report = run(cfg, tmp_path)
    assert [(c.seed, c.preferences.world.options["seed"], out.name) for c, out in fake_runs] == [
        (3, 3, "seed-3"), (5, 5, "seed-5"), (8, 8, "seed-8")]
    assert report["seeds"] == [3, 5, 8] and report["runs"] == {"3": "seed-3", "5": "seed-5", "8": "seed-8"}
    maxmin = report["policies"]["maxmin"]
    assert maxmin["per_seed"]["group_reward"]["concise"] == pytest.approx(
        [fake_run_report(load_config(None, overrides=[f"seed={s}"]), 0.1 * s)["policies"]["maxmin"]["group_reward"]
         ["concise"] for s in (3, 5, 8)])
    assert json.loads((tmp_path / "report.json").read_text())["seeds"] == [3, 5, 8]
    for name in ("table.txt", "group_rewards.png", "win_rates.png", "curves.png", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "Student t over 3 seeds" in (tmp_path / "table.txt").read_text()
    heads = report["group_heads"]["concise"]
    assert [e["status"] for e in heads["per_seed"]] == ["ok"] * 3 and heads["flagged_seeds"] == []
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "policy").mkdir(parents=True)
    with pytest.raises(RunDirError, match="holds a single run"):
        run(cfg, tmp_path / "single")
    with pytest.raises(ConfigError, match="at least 2 distinct seeds"):
        load_config(None, overrides=["seeds=[1, 1]"])


def test_sweep_command_prints_every_setting(capsys):
    from maxmin_jax.cli import main

    assert main(["sweep", str(ROOT / "configs" / "sweep_review.yaml"), "--print-config",
                 "--set", "preferences.world.num_users=44"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("# setting ") == 8 and printed.count("num_users: 44") == 8
    assert "majority_share: 0.9677" in printed and "distance: 0.5" in printed
