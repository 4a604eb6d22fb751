"""Preference worlds written outside the EM's design: a check of the defaults on data nobody tuned them for.

    python -m benchmarks.outside_worlds --out /tmp/outside [--only 1,7] [--seeds 0,1] [--set response_ends=off]
    python -m benchmarks.outside_worlds --worlds unseen --out /tmp/unseen   # benchmarks/unseen_worlds.py's eight

Eight worlds written on 2026-12-01 by an author who had not read the zoo's generator, docs/em.md or the EM code
(asked for worlds that differ in what separates the groups): sentiment with negation ("not good"), questions
against statements, a preferred length band, a bigram ("step by step"), numbers (10:1), register (polite, blunt,
plain), the response's first word, and a mix of four criteria. Responses are built from phrase chunks (neutral,
sentiment, polite, blunt, number, prompt keyword, bigram, decoy, question word) in per-response proportions; users
of group g label a pair by Bradley-Terry on g's true reward at temperature T, then a share of labels is flipped.
The oracle assigns each user by the true rewards; the fitted oracle by heads on the true rewards' log-odds fitted on
the true groups without the user (`rewards.fitted_oracle`): what a correctly specified model could recover.

Each world is written as `fit-rewards` reads it (prefs.jsonl, and truth.json with each user's group), with a tiny
random GPT-2 (one layer, hidden 32) over a word-level tokenizer, and fitted by the command line given only
--num-groups K, as a new user would; prints each fit's ARI against the truth and the oracle's. Since their first
measurement (docs/em.md, "Worlds written outside the project") these worlds are no longer unseen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------- vocabulary
FUNC = ("the a an of to in on for with by at from and or but is are was it this that you i we they my your our "
        "can will should would could do does have has be if then also more some all any each no").split()
NOUNS = ("garden kitchen car engine laptop battery recipe soup bread river mountain city train ticket phone screen "
         "printer paper report meeting budget project team manager email letter song guitar piano movie book chapter "
         "story dog cat bird tree flower window door roof wall paint brush bike tire chain road map trip hotel beach "
         "coffee tea cup plate oven fridge shirt shoe jacket rain snow weather plant seed soil water lamp bulb desk "
         "chair code bug server file folder password account bank loan price store market doctor pill sleep exercise "
         "step time plan idea question answer problem solution course way").split()
VERBS = ("fix make use try check clean cook bake buy sell read write send open close start stop run walk drive build "
         "plant wash change move keep find call ask tell learn teach save pay choose follow replace turn help").split()
ADJ = ("small large old new red blue green warm cold short long quick slow simple heavy early late fresh dry wet "
       "clear quiet loud main local basic extra whole other right").split()
POS = ("good great excellent wonderful lovely pleasant fantastic helpful nice brilliant delightful superb amazing "
       "reliable enjoyable perfect solid charming useful fine").split()
NEG = ("bad awful terrible poor horrible dreadful useless broken ugly annoying disappointing weak boring messy "
       "painful unpleasant faulty mediocre lousy clumsy").split()
NEGATORS = "not never hardly".split()
INTENS = "very really quite rather truly".split()
POLITE = "please thanks thank kindly appreciate grateful sorry pardon gladly welcome".split()
BLUNT = "obviously whatever seriously duh nope frankly anyway literally".split()
DIGITS = "0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 50 100 2020".split()
NUMWORDS = "one two three four five six seven eight nine ten twenty hundred dozen".split()
NUMBERS = DIGITS + NUMWORDS
UNITS = "minutes hours days percent dollars times weeks".split()
AFFIRM = "yes sure certainly absolutely definitely yeah".split()
HEDGE = "maybe perhaps possibly probably likely presumably".split()
OTHER_OPEN = "well okay so hmm first".split()
QWORDS = "what how why when where which who".split()
EXTRA = "away me about best note tips explain give just am".split()
PUNCT = ["?", ".", ","]
CONTENT = set(NOUNS) | set(VERBS)

def vocab():
    seen, out = set(), []
    for w in (FUNC + NOUNS + VERBS + ADJ + POS + NEG + NEGATORS + INTENS + POLITE + BLUNT + NUMBERS + UNITS + AFFIRM
              + HEDGE + OTHER_OPEN + QWORDS + EXTRA + PUNCT):
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out

# ----------------------------------------------------------------------------- prompts / responses
PROMPT_T = [
    "how do i {v} my {n} ?", "tell me about the {a} {n} .", "what is the best way to {v} a {n} ?",
    "help me {v} the {n} and the {n} .", "write a note about my {n} .", "why does my {n} {v} so {a} ?",
    "give me tips to {v} the {n} .", "can you explain the {n} to me ?",
]
CHUNKS = ["neutral", "sentiment", "polite", "blunt", "number", "keyword", "bigram", "decoy", "qword"]
BASE_W = np.array([0.37, 0.15, 0.08, 0.08, 0.08, 0.08, 0.08, 0.04, 0.04])
BIGRAMS = [["step", "by", "step"], ["in", "short"], ["right", "away"], ["of", "course"]]


def make_prompt(rng):
    t = PROMPT_T[rng.integers(len(PROMPT_T))]
    out = []
    for tok in t.split():
        if tok == "{v}":
            out.append(rng.choice(VERBS))
        elif tok == "{n}":
            out.append(rng.choice(NOUNS))
        elif tok == "{a}":
            out.append(rng.choice(ADJ))
        else:
            out.append(tok)
    return " ".join(out)


def chunk(kind, rng, prompt_kw):
    c = rng.choice
    if kind == "neutral":
        pat = rng.integers(4)
        if pat == 0:
            return [c(["the", "a", "my", "your"]), c(NOUNS), c(["can", "will", "should"]), c(VERBS), "the", c(NOUNS)]
        if pat == 1:
            return [c(VERBS), "the", c(ADJ), c(NOUNS)]
        if pat == 2:
            return ["you", c(["can", "should", "could"]), c(VERBS), c(["it", "the " + c(NOUNS)])]
        return [c(["and", "but", "then", "also"]), c(FUNC), c(NOUNS)]
    if kind == "sentiment":
        w = c(POS) if rng.random() < 0.5 else c(NEG)
        out = [c(["it", "this", "that"]), c(["is", "was"])]
        if rng.random() < 0.35:
            out.append(c(NEGATORS))
        if rng.random() < 0.4:
            out.append(c(INTENS))
        return out + [w] if rng.random() < 0.7 else out + [w, c(NOUNS)]
    if kind == "polite":
        return list(c(["please", "thank you", "thanks", "i appreciate it", "kindly " + c(VERBS) + " the " + c(NOUNS),
                       "sorry for the " + c(NOUNS), "i am grateful", "gladly", "you are welcome"]).split())
    if kind == "blunt":
        return list(c(["obviously", "whatever", "just " + c(VERBS) + " it", "seriously", "nope", "frankly",
                       "duh", "anyway", "literally " + c(VERBS) + " the " + c(NOUNS)]).split())
    if kind == "number":
        pat = rng.integers(3)
        if pat == 0:
            return ["about", c(NUMBERS), c(UNITS)]
        if pat == 1:
            return [c(NUMBERS), c(NOUNS)]
        return ["in", c(NUMBERS), c(UNITS)]
    if kind == "keyword":
        kw = c(prompt_kw) if prompt_kw else c(NOUNS)
        return [c(["the", "your", "with", "for"]), kw]
    if kind == "bigram":
        return list(BIGRAMS[rng.integers(len(BIGRAMS))])
    if kind == "decoy":
        return [c(AFFIRM + HEDGE)]
    if kind == "qword":
        return [c(QWORDS), c(["about", "is", "to"]), "the", c(NOUNS)]
    raise ValueError(kind)


def make_response(rng, prompt):
    kw = [w for w in prompt.split() if w in CONTENT]
    L = int(rng.integers(5, 26))  # words incl. opener, excl. final punctuation
    w = rng.dirichlet(5.0 * BASE_W / BASE_W.sum())
    toks = []
    r = rng.random()
    if r < 0.5:
        toks.append(rng.choice([AFFIRM, HEDGE, OTHER_OPEN][rng.integers(3)]))
        if rng.random() < 0.5:
            toks.append(",")
    while len(toks) < L:
        toks += chunk(CHUNKS[rng.choice(len(CHUNKS), p=w)], rng, kw)
    toks = toks[:L]
    toks.append("?" if rng.random() < 0.3 else ".")
    return " ".join(toks)

# ----------------------------------------------------------------------------- features
def toks(s):
    return s.split()


def sentiment(s):
    t = toks(s)
    tot = 0.0
    for i, w in enumerate(t):
        if w in POS or w in NEG:
            p = 1.0 if w in POS else -1.0
            if any(x in NEGATORS for x in t[max(0, i - 2):i]):
                p = -p
            tot += p
    return tot


def is_question(s):
    return 1.0 if toks(s)[-1] == "?" else 0.0


def length(s):
    return float(sum(1 for w in toks(s) if w not in PUNCT))


def count_in(s, words):
    return float(sum(1 for w in toks(s) if w in words))


def has_bigram(s, bg):
    t = toks(s)
    n = len(bg)
    return 1.0 if any(t[i:i + n] == bg for i in range(len(t) - n + 1)) else 0.0


def first_word(s):
    return toks(s)[0]


def overlap(prompt, s):
    kw = {w for w in prompt.split() if w in CONTENT}
    return float(min(3, len(kw & set(toks(s)))))

# ----------------------------------------------------------------------------- worlds
# Each world: desc, groups (list of reward fns (prompt, response) -> float), sizes, pairs (lo, hi), flip, T
WORLDS = {
    1: dict(desc="negation-aware sentiment: enthusiasts (+sent), critics (-sent), neutralists (-|sent|); 'not good' counts negative",
            rewards=[lambda p, s: sentiment(s), lambda p, s: -sentiment(s), lambda p, s: -abs(sentiment(s))],
            sizes=[20, 20, 20], pairs=(28, 32), flip=0.03, T=0.35),
    2: dict(desc="questions vs statements (response ends with '?'), 3:1 shares",
            rewards=[lambda p, s: 1.5 * is_question(s), lambda p, s: -1.5 * is_question(s)],
            sizes=[36, 12], pairs=(12, 18), flip=0.03, T=0.5),
    3: dict(desc="preferred length band: short (~7 words) / medium (~15) / long (~22)",
            rewards=[lambda p, s, c=c: -abs(length(s) - c) / 3.0 for c in (7, 15, 22)],
            sizes=[20, 20, 20], pairs=(22, 30), flip=0.03, T=0.5),
    4: dict(desc="specific bigram: 'step by step' lovers vs 'in short' lovers (words also occur apart), 2:1",
            rewards=[lambda p, s: 2.0 * has_bigram(s, ["step", "by", "step"]) - 0.5 * has_bigram(s, ["in", "short"]),
                     lambda p, s: 2.0 * has_bigram(s, ["in", "short"]) - 0.5 * has_bigram(s, ["step", "by", "step"])],
            sizes=[36, 18], pairs=(26, 32), flip=0.03, T=0.3),
    5: dict(desc="mentions of numbers (digits or number words): majority dislikes, minority loves, 10:1",
            rewards=[lambda p, s: -0.8 * min(3.0, count_in(s, NUMBERS)), lambda p, s: 1.5 * min(3.0, count_in(s, NUMBERS))],
            sizes=[60, 6], pairs=(18, 26), flip=0.06, T=0.5),
    6: dict(desc="register: polite (+polite-blunt) / blunt (+blunt-polite) / plain (-(polite+blunt)), 2:1:1",
            rewards=[lambda p, s: count_in(s, POLITE) - count_in(s, BLUNT),
                     lambda p, s: count_in(s, BLUNT) - count_in(s, POLITE),
                     lambda p, s: -(count_in(s, POLITE) + count_in(s, BLUNT))],
            sizes=[32, 16, 16], pairs=(16, 24), flip=0.03, T=0.45),
    7: dict(desc="first word only: affirmative opener (yes/sure/...) vs hedging opener (maybe/perhaps/...); same words elsewhere are decoys, 3:2",
            rewards=[lambda p, s: 2.0 * (first_word(s) in AFFIRM), lambda p, s: 2.0 * (first_word(s) in HEDGE)],
            sizes=[24, 16], pairs=(24, 32), flip=0.02, T=0.6),
    8: dict(desc="mixed: echo prompt keywords / positive sentiment / keywords AND questions / brevity, 4:3:2:1",
            rewards=[lambda p, s: overlap(p, s),
                     lambda p, s: sentiment(s),
                     lambda p, s: 0.6 * overlap(p, s) + 2.0 * is_question(s),
                     lambda p, s: -length(s) / 5.0],
            sizes=[32, 24, 16, 8], pairs=(28, 32), flip=0.08, T=0.4),
}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def build(i: int, seed: int | None = None) -> tuple[list[dict], dict[str, int], dict]:
    """World i's labelled pairs, each user's true group, and its description with the oracle ARI."""
    from sklearn.metrics import adjusted_rand_score

    spec = WORLDS[i]
    rng = np.random.default_rng(1000 + i if seed is None else seed)
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(spec["sizes"])])
    rng.shuffle(groups)
    rows, truth, oracle = [], {}, []
    k = len(spec["sizes"])
    for u, g in enumerate(groups):
        uid = f"u{u:03d}"
        truth[uid] = int(g)
        ll = np.zeros(k)
        for _ in range(int(rng.integers(spec["pairs"][0], spec["pairs"][1] + 1))):
            p = make_prompt(rng)
            a, b = make_response(rng, p), make_response(rng, p)
            while a == b:
                b = make_response(rng, p)
            a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(spec["rewards"][g](p, a) - spec["rewards"][g](p, b))
                                                          / spec["T"]))
            if rng.random() < spec["flip"]:
                a_wins = not a_wins
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append(dict(user_id=uid, prompt=p, chosen=chosen, rejected=rejected))
            ll += [_log_sigmoid((r(p, chosen) - r(p, rejected)) / spec["T"]) for r in spec["rewards"]]
        oracle.append(int(np.argmax(ll)))
    meta = dict(world=i, description=spec["desc"], K=k, sizes=spec["sizes"], pairs_per_user=list(spec["pairs"]),
                flip=spec["flip"], T=spec["T"], oracle_ari=float(adjusted_rand_score(groups, oracle)))
    return rows, truth, meta


def write_model(directory: str) -> None:
    """A word-level tokenizer over the worlds' vocabulary and a random one-layer GPT-2, saved as a checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]"] + vocab()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                                       bos_token_id=2, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)


def fit(world_dir: str, model_dir: str, k: int, seed: int, extra: list[str]) -> dict:
    """`maxmin-jax fit-rewards` on one world, as a user runs it; its ARI against truth.json and its warnings."""
    from sklearn.metrics import adjusted_rand_score

    out = os.path.join(world_dir, f"fit_s{seed}")
    cmd = [sys.executable, "-m", "maxmin_jax.cli", "fit-rewards", "--data", os.path.join(world_dir, "prefs.jsonl"),
           "--model", model_dir, "--num-groups", str(k), "--seed", str(seed), "--out", out, "--overwrite", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    found = json.load(open(os.path.join(out, "assignments.json")))
    truth = json.load(open(os.path.join(world_dir, "truth.json")))
    users = sorted(truth)
    history = json.load(open(os.path.join(out, "em_history.json")))
    chosen = {k: v for k, v in history["init"]["feature_set"].items() if k != "scores"}
    return {"ari": float(adjusted_rand_score([truth[u] for u in users], [found[u] for u in users])),
            "seconds": round(seconds, 1), "feature_set": chosen, "warnings": history.get("warnings", [])}


def fitted_oracle_ari(rows: list[dict], truth: dict[str, int], spec: dict) -> float:
    """ARI of the fitted oracle (`rewards.fitted_oracle`) on a world's rows: heads on each group's true log-odds
    (reward gap over the world's temperature T) with its flip rate, fitted on the true groups without the user
    scored."""
    from sklearn.metrics import adjusted_rand_score

    from maxmin_jax.rewards.fitted_oracle import fitted_oracle_assignments

    users = {u: i for i, u in enumerate(dict.fromkeys(r["user_id"] for r in rows))}
    log_odds = np.array([[(reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"])) / spec["T"]
                          for reward in spec["rewards"]] for r in rows])
    groups = np.array([truth[u] for u in users])
    found = fitted_oracle_assignments(log_odds, np.array([users[r["user_id"]] for r in rows]), groups,
                                      flip_rate=spec["flip"])
    return float(adjusted_rand_score(groups, found))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.outside_worlds", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the worlds, the model and the fits")
    p.add_argument("--worlds", choices=("outside", "unseen"), default="outside",
                   help="this file's eight worlds, or benchmarks/unseen_worlds.py's (written later by another "
                        "outside author, with a subword tokenizer)")
    p.add_argument("--only", default="", help="comma-separated world numbers (1-8); default all")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an EMConfig field, passed to fit-rewards as --field value (repeatable)")
    p.add_argument("--oracles-only", action="store_true", help="the worlds and their oracles, no fits")
    args = p.parse_args(argv)

    from benchmarks import env

    environment = env.describe()
    extra = [a for s in args.set for a in (f"--{s.split('=', 1)[0].replace('_', '-')}", s.split("=", 1)[1])]
    model_dir = os.path.join(args.out, "model")
    os.makedirs(args.out, exist_ok=True)
    worlds = sys.modules[__name__]
    if args.worlds == "unseen":
        from benchmarks import unseen_worlds as worlds
    worlds.write_model(model_dir)
    results = []
    for i in [int(w) for w in args.only.split(",") if w] or sorted(worlds.WORLDS):
        rows, truth, meta = worlds.build(i)
        world_dir = os.path.join(args.out, f"w{i}")
        os.makedirs(world_dir, exist_ok=True)
        with open(os.path.join(world_dir, "prefs.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        json.dump(truth, open(os.path.join(world_dir, "truth.json"), "w"))
        meta["oracle_fitted"] = fitted_oracle_ari(rows, truth, worlds.WORLDS[i])
        meta["fits"] = {} if args.oracles_only else {s: fit(world_dir, model_dir, meta["K"], int(s), extra)
                                                     for s in args.seeds.split(",")}
        results.append(meta)
        print(f"w{i} K={meta['K']} {':'.join(map(str, meta['sizes']))} oracle {meta['oracle_ari']:.2f} "
              f"fitted oracle {meta['oracle_fitted']:.2f} "
              + " ".join(f"s{s} {r['ari']:.2f} ({r['seconds']:.0f} s)" for s, r in meta["fits"].items())
              + f"  {meta['description']}", flush=True)
        json.dump({"command": "python -m benchmarks.outside_worlds " + " ".join(argv or sys.argv[1:]),
                   "environment": environment, "worlds": results},
                  open(os.path.join(args.out, "results.json"), "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
