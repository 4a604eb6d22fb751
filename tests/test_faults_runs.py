"""Fault injection into runs (the output directory, resumption, numerical faults), cheap cases only; the policy
loop's numerical stop and the killed multi-stage run are in tests/test_pipeline.py (they share its compiled run):

- an output directory is held by one writer (a second is refused, naming the first; a SIGKILLed holder blocks
  nothing), a non-empty directory that is not ours is refused, `overwrite` empties ours;
- a resumed run identifies its inputs by content: a changed preference file under the same path is refused,
  naming the key; the same bytes elsewhere are accepted;
- outputs are published whole: a publication cut short is completed by the next writer, never left mixed;
- a reward fit that did not train (non-finite history, every M-step rejected) is never written or loaded as trained;
- the CLI exits 2 for input errors and 3 for numerical faults, one line each;
- fit-rewards SIGKILLed after EM (before its state is saved) or half-way through publishing its outputs, then run
  again, ends with exactly the outputs of an uninterrupted run.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import save_word_gpt2
from maxmin_jax.cli import main
from maxmin_jax.data.synthetic import planted_world
from maxmin_jax.errors import CheckpointError, ConfigError, NumericalFault, RunDirError
from maxmin_jax.guards import check_fit_history
from maxmin_jax.pipeline import FilePreferences, FitRewards, LoadRewards, PretrainedModel, RunConfig, outdir
from maxmin_jax.pipeline.provenance import Digests, identify_inputs
from maxmin_jax.pipeline.runners import Context
from maxmin_jax.pipeline.stages import load_rewards
from maxmin_jax.policy.training import FAULT_LIMITS, flag_faults
from maxmin_jax.rewards.em import EMConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inputs(tmp_path):
    """A config over local inputs: a (fake) checkpoint directory and a preference file."""
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "README.md").write_text("notes")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    cfg = RunConfig(model=PretrainedModel(policy=str(model)), preferences=FilePreferences(files=str(prefs)),
                    rewards=FitRewards(em=EMConfig(num_groups=2), single_reward_steps=0))
    return cfg, model, prefs


def context(cfg, out, **kwargs) -> Context:
    return Context(cfg, out, stages=("rewards",), progress=False, **kwargs)


# --- the output directory --------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(inputs, tmp_path):
    cfg, _, _ = inputs
    out = tmp_path / "out"
    with context(cfg, out):
        with pytest.raises(RunDirError, match=rf"{out}: another run is writing here \(pid {os.getpid()} on "):
            context(cfg, out)
    with context(cfg, out):  # released on exit
        pass
    # Another process holding the lock as a run does (flock on the marker, its description in it); stdlib only,
    # so it starts at once.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, json, os, time
        fd = os.open({str(out / outdir.MARKER)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({{"pid": os.getpid(), "host": "node7", "command": "maxmin-jax run",
                                   "since": "today"}}).encode(), 0)
        print("locked", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"pid {holder.pid} on node7, since today: maxmin-jax run\); "
                                              "refusing a second writer"):
            context(cfg, out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with context(cfg, out):  # the kernel dropped the dead holder's lock
        pass


def test_a_directory_that_is_not_ours_is_refused_and_overwrite_empties_ours(inputs, tmp_path):
    cfg, _, _ = inputs
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match=r"theirs: not empty \(thesis.tex\) and not an output directory"):
            context(cfg, theirs, overwrite=overwrite)
    assert os.listdir(theirs) == ["thesis.tex"]  # nothing written, nothing deleted
    out = tmp_path / "out"
    with context(cfg, out) as ctx:
        ctx.stage("rewards/mixture").start()
        (out / "stale.txt").write_text("from before")
    with context(cfg, out, overwrite=True):
        assert sorted(os.listdir(out)) == [".maxmin-jax", "config.yaml"]
    # A run that fails before doing anything leaves no directory behind.
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyError):
        with context(cfg, fresh):
            raise KeyError("failed at once")
    assert not fresh.exists()


def test_resume_refuses_changed_inputs_by_content_naming_the_key(inputs, tmp_path):
    cfg, model, prefs = inputs
    out = tmp_path / "out"
    with context(cfg, out) as ctx:
        ctx.stage("rewards/mixture").start()
    with context(cfg, out):  # the same inputs: a resume
        pass
    (model / "README.md").write_text("edited notes")  # not what the model is
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(prefs.read_bytes())
    with context(_with_prefs(cfg, moved), out):  # the same bytes under another path
        pass
    prefs.write_text(prefs.read_text().replace('"a"', '"c"'))
    with pytest.raises(RunDirError) as err:
        context(cfg, out)
    [line] = err.value.differences
    assert line.startswith("rewards/mixture: preferences.files: content changed (sha256 ")
    assert "start afresh with overwrite=True" in str(err.value)
    (model / "model.safetensors").write_bytes(b"\1" * 64)
    with pytest.raises(RunDirError) as err:
        context(cfg, out)
    assert [line.split(":")[1].strip() for line in err.value.differences] == ["model.policy", "preferences.files"]


def _with_prefs(cfg, path):
    return dataclasses.replace(cfg, preferences=FilePreferences(files=str(path)))


def test_digests_cover_a_directory_and_hub_names(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "w.bin").write_bytes(os.urandom(3000))
    digests = Digests(workers=2)
    first = digests.of(tmp_path / "d")
    (tmp_path / "d" / "sub" / "w.bin").rename(tmp_path / "d" / "w.bin")  # same bytes, another relative path
    assert digests.of(tmp_path / "d") != first
    config = identify_inputs({"model": {"policy": "gpt2", "tokenizer": str(tmp_path / "d")}})
    assert config["model"]["policy"] == "hub:gpt2" and config["model"]["tokenizer"].startswith("sha256:")
    with pytest.raises(CheckpointError, match="no_such_dir"):
        identify_inputs({"model": {"policy": str(tmp_path / "no_such_dir")}})


def test_a_publication_cut_short_is_completed_by_the_next_writer(tmp_path, monkeypatch):
    into = tmp_path / "out"
    into.mkdir()
    for name in ("a.json", "b.json"):
        (into / name).write_text("old")
    with pytest.raises(ZeroDivisionError), outdir.publishing(into) as staging:
        (staging / "a.json").write_text("half")
        1 / 0
    assert {p.name: p.read_text() for p in into.iterdir()} == {"a.json": "old", "b.json": "old"}

    moved, real_move = [], outdir._move_in

    def dies_after_one(source, target, trash):
        if moved:
            raise KeyboardInterrupt  # the process dies between the renames
        moved.append(target.name)
        real_move(source, target, trash)

    monkeypatch.setattr(outdir, "_move_in", dies_after_one)
    with pytest.raises(KeyboardInterrupt), outdir.publishing(into) as staging:
        for name in ("a.json", "b.json"):
            (staging / name).write_text("new")
    monkeypatch.undo()
    assert outdir.incomplete(into)  # a reader sees it was cut short
    with pytest.raises(CheckpointError, match="stopped while publishing its results"):
        load_rewards(None, LoadRewards(path=str(into)))
    outdir.recover(into)
    assert {p.name: p.read_text() for p in into.iterdir()} == {"a.json": "new", "b.json": "new"}


# --- numerical faults ------------------------------------------------------------------------------------------

def _history(**last):
    rows = [{"round": 1, "m_step_accepted": True, "m_step_loss": 0.6, "m_step_steps": 3},
            {"round": 2, "m_step_accepted": True, "m_step_loss": 0.5, "m_step_steps": 3}]
    rows[-1] |= last
    return rows


def test_a_reward_fit_that_did_not_train_is_a_fault_and_never_loaded(tmp_path):
    check_fit_history(_history(), where="rewards/mixture", m_steps=3)
    with pytest.raises(NumericalFault, match=r"rewards/mixture: m_step_loss = nan in round 2 \(not finite\)"):
        check_fit_history(_history(m_step_loss=float("nan")), where="rewards/mixture", m_steps=3)
    rejected = [{**row, "m_step_accepted": False} for row in _history()]
    with pytest.raises(NumericalFault, match=r"every M-step was rejected \(2 of 2 rounds.*not written"):
        check_fit_history(rejected, where="rewards/mixture", m_steps=3)
    # Written by a version that wrote NaN: refused when loaded, before the model is read.
    fit = tmp_path / "fit"
    fit.mkdir()
    (fit / "em_history.json").write_text('{"history": [{"round": 1, "m_step_loss": NaN}], "weights": [1.0]}')
    with pytest.raises(CheckpointError, match=r"em_history.json: holds NaN, which is not a number in JSON"):
        load_rewards(None, LoadRewards(path=str(fit)))
    (fit / "em_history.json").write_text(json.dumps({"history": rejected, "weights": [0.5, 0.5],
                                                     "config": {"steps_per_round": 3}}))
    with pytest.raises(CheckpointError, match=r"this reward model did not train"):
        load_rewards(None, LoadRewards(path=str(fit)))


def test_every_trainer_flags_the_same_quantities():
    """PPO, critic-free and offline steps report different metrics; each is checked against one table."""
    ppo = {"policy_loss": 0.1, "value_loss": np.inf, "grad_norm": 1.0, "kl": 0.5, "approx_kl": 0.01, "score": 0.2}
    critic_free = {"loss": 0.1, "grad_norm": 2e6, "kl": 0.5, "score": 0.2, "entropy": np.nan}
    offline = {"loss": 0.7, "group_loss": np.array([0.6, np.nan]), "grad_norm": 1.0, "accuracy": 0.5}
    raised = {name: sorted(k.split("/")[1] for k, v in flag_faults(m).items() if bool(v))
              for name, m in (("ppo", ppo), ("critic_free", critic_free), ("offline", offline))}
    assert raised == {"ppo": ["value_loss"], "critic_free": ["grad_norm"], "offline": ["group_loss"]}
    assert set(flag_faults(critic_free)) == {f"fault/{k}" for k in ("loss", "grad_norm", "kl", "score")}
    assert FAULT_LIMITS["score"] is None  # the score is only required to be finite


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_exit_codes(monkeypatch, tmp_path, capsys):
    def diverged(*args, **kwargs):
        raise NumericalFault("policy/maxmin/ppo: grad_norm = nan at step 3 (not finite); the run is stopped",
                             quantity="grad_norm", value=float("nan"), step=3)

    monkeypatch.setattr("maxmin_jax.pipeline.run", diverged)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("maxmin-jax demo: numerical fault: policy/maxmin/ppo: grad_norm = nan at step 3")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(theirs), "--set", "policy.iterations=1"]) == 2
    assert "not an output directory of maxmin-jax" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "bool"), "--set", "policy.iterations=true"]) == 2
    err = capsys.readouterr().err
    assert "policy.iterations" in err and "bool" in err and not (tmp_path / "bool").exists()  # before any output


def test_rewards_path_as_the_output_directory_is_refused(inputs, tmp_path):
    from maxmin_jax.pipeline import train_policy

    cfg = dataclasses.replace(inputs[0], preferences=None, rewards=LoadRewards(path=str(tmp_path / "fit")))
    with pytest.raises(ConfigError, match=r"rewards.path: .* is also the output directory"):
        train_policy(cfg, tmp_path / "fit")


# --- fit-rewards killed and run again ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fit_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    world = planted_world(num_groups=2, group_sizes=(2, 2), pairs_per_user=4, seed=0)
    save_word_gpt2(root / "ckpt", world.tokenizer())
    rows = [{"user_id": r.user_id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for r in world.preference_rows(0)]
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def fit_args(root: Path, out: Path) -> list[str]:
    return ["--data", str(root / "prefs.jsonl"), "--model", str(root / "ckpt"), "--num-groups", "2", "--out",
            str(out), "--rounds", "2", "--steps", "2", "--batch-size", "8"]


def fit_outputs(out: Path) -> tuple:
    from maxmin_jax.rewards.fit import load_reward_model

    state = jax.device_get(nnx.to_pure_dict(nnx.state(load_reward_model(out / "reward_model"))))
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    return (entries, (out / "assignments.json").read_text(), (out / "em_history.json").read_text(),
            jax.tree.leaves(state))


@pytest.mark.parametrize("point", ["fitted", "publishing"])
def test_killed_fit_rewards_reruns_to_the_uninterrupted_outputs(fit_inputs, tmp_path_factory, point, capsys):
    reference = fit_inputs / "uninterrupted"
    if not reference.exists():
        assert main(["fit-rewards", *fit_args(fit_inputs, reference)]) == 0
    expected = fit_outputs(reference)
    out = tmp_path_factory.mktemp(point) / "out"
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "killed_fit.py"), point,
                             *fit_args(fit_inputs, out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    stage = json.loads((out / "rewards/mixture/stage.json").read_text())
    if point == "fitted":  # nothing of the fit was kept: the rerun fits again from the start
        assert stage["status"] == "running" and not (out / "em_history.json").exists()
    else:  # one output renamed into place, the others still staged: readers are told
        assert stage["status"] == "done" and outdir.incomplete(out)
        assert sum((out / name).exists() for name in ("assignments.json", "em_history.json", "reward_model")) == 1
    assert main(["fit-rewards", *fit_args(fit_inputs, out)]) == 0
    assert not outdir.incomplete(out)
    got = fit_outputs(out)
    assert got[:3] == expected[:3]
    for a, b in zip(got[3], expected[3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_pair_too_long_for_the_model_is_named_before_any_output(fit_inputs, tmp_path, capsys):
    rows = (fit_inputs / "prefs.jsonl").read_text().splitlines()
    long = {**json.loads(rows[0]), "chosen": " ".join(["great"] * 80)}  # the checkpoint has 64 positions
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join([rows[1], rows[2], json.dumps(long), *rows[3:]]))
    args = fit_args(fit_inputs, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    assert main(["fit-rewards", *args]) == 2
    err = capsys.readouterr().err
    assert f"{data}: row 3: field 'prompt' + 'chosen': " in err and "expected at most max_length=64" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
