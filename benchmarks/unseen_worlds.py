"""Eight more preference worlds written outside the project, for checking how the clustering generalises.

    from benchmarks.unseen_worlds import WORLDS, build, write_model
    rows, truth, meta = build(3)          # rows: user_id, prompt, chosen, rejected; truth: user_id -> group
    write_model("/tmp/model")             # byte-level BPE tokenizer (600 pieces) + random one-layer GPT-2

Written by an author who had read only benchmarks/outside_worlds.py (for the interface), not the method, its docs
or its tests. The groups here are separated by other things than in that file: how the answer signs off, whether
it enumerates steps (numbered or "First, ... Finally, ..."), proper names against hyphenated compounds, redundancy,
a causal word liked only when the prompt asks "why", staying on the prompt's topic against cost/safety remarks
(with an indifferent group), where the advice sentence sits, and a 2x2 of second-person address and examples plus
a small group that likes exclamation marks.

Text is natural-ish English (sentence case, attached punctuation) from one shared generator: a prompt in one of
six topics (kitchen, garden, computer, travel, health, bike) and one of four kinds (why / how / which-what /
request), and a response assembled from sentences - prose, a numbered list or an ordinal sequence, plus optional
advice, causal clause, example, cost, safety, name, restatement, opener, decoy sign-off and closing sentences,
with per-response knobs for off-topic drift, second-person share, hyphenated adjectives, exclamation marks and
noun repetition. Every world sees all of that variation; its groups care about one or two aspects. A world's spec
may override a few generator probabilities under "gen": world 5 asks more "why" questions and uses more causal
clauses, world 6 more cost and safety remarks, world 8 more examples.

Users of group g label a pair (a, b) by P(a chosen) = sigmoid((r_g(a) - r_g(b)) / T), then each label is flipped
with probability `flip`. meta["oracle_ari"] assigns each user to the group whose true rewards give the user's
labels the highest Bradley-Terry log-likelihood (flips ignored) and scores it against the truth. T was set per
world so that the oracle ARI at the default seed (2000 + i) is >= 0.9 in all eight; over other seeds it moves
(one misplaced user in world 4's five-user group gives 0.88), and world 6, whose indifferent group competes with
every other group for users with a few flipped labels, averages about 0.85 over seeds 1-5.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

__all__ = ["WORLDS", "build", "write_model"]
# ----------------------------------------------------------------------------- lexicon
_TOPICS = {  # nouns, verbs that fit them, adjectives for prompts
    "kitchen": ("soup bread oven pan rice sauce cake kettle".split(), "clean heat store season cook".split(),
                "soggy burnt sticky bland".split()),
    "garden": ("tomato lawn hedge rose soil hose seedling shed".split(), "water plant trim feed cover".split(),
               "dry yellow weak patchy".split()),
    "computer": ("laptop printer router password screen keyboard battery backup".split(),
                 "restart update reset repair replace".split(), "slow noisy hot frozen".split()),
    "travel": ("ticket train hotel passport suitcase flight luggage visa".split(), "book pack plan cancel change".split(),
               "late crowded stressful tiring".split()),
    "health": ("sleep knee diet back posture headache breakfast muscle".split(),
               "improve rest track ease support".split(), "stiff sore tired restless".split()),
    "bike": ("bike tire chain brake saddle pedal helmet wheel".split(), "repair oil pump adjust tighten".split(),
             "loose squeaky rusty flat".split()),
}
_TOPIC_NAMES = list(_TOPICS)
_NOUN_TOPIC = {n: t for t, (ns, _, _) in _TOPICS.items() for n in ns}
_GEN_VERBS = "check clean test replace use".split()
_ADJ = "good simple new small large spare basic sturdy light gentle fresh warm soft strong thin quick".split()
_PADJ = "dry clean warm steady tight soft stable fine".split()
_HYPH = ("long-lasting easy-to-use well-made heavy-duty old-fashioned high-quality user-friendly water-resistant "
         "eco-friendly hands-free time-saving up-to-date non-stick").split()
_RELS = "mum dad son daughter neighbour flatmate".split()
_WHEN = "morning evening winter summer".split()
_NUMS = "2 3 5 10 15 20 30".split()
_PEOPLE = "Sarah Tom Maria Ahmed Lee".split()
_PLACES = "Paris London Berlin Tokyo Denver Oslo".split()
_DAYS = "Monday Friday Sunday".split()
_BRANDS = "Bosch Ikea Dell Shimano Philips".split()
_NAME_SET = set(_PEOPLE + _PLACES + _DAYS + _BRANDS)

_PROMPTS = {
    "why": ["why does my {n} get so {pa} every time?", "why is my {n} always {pa} in the {when}?",
            "why do people {v} their {n} so often?", "why would my {n} become {pa} after I {v} it?"],
    "how": ["how do I {v} my {n}?", "how should I {v} a {pa} {n} at home?",
            "how can I {v} the {n} without a new {n2}?"],
    "which": ["which {n} would you get for my {rel}?", "what is a good way to {v} the {n}?",
              "what should I do about a {pa} {n}?"],
    "request": ["give me some tips to {v} my {n}.", "please help me {v} the {n} before the weekend.",
                "tell me how to {v} a {n} for my {rel}."],
}
_MODS = ["every week", "once a month", "in the morning", "after a day or two", "at least once", "slowly",
         "for a while", "before the weekend", "with a {aa} {n2}", "with a {aa} {n2}"]
_PROSE_YOU = ["you can {v} the {n} {mod}", "you should {v} your {n} {mod}", "if your {n} is {pa}, you can {v} it {mod}",
              "you might want to {v} the {n} {mod}", "your {n} needs a {aa} {n2}"]
_PROSE_IMP = ["it is best to {v} the {n} {mod}", "most people {v} the {n} {mod}", "a {aa} {n} is usually enough",
              "the {n} should stay {pa}", "it helps to {v} the {n} {mod}"]
_PROSE_CMD = ["try to {v} the {n} {mod}", "{v} the {n} {mod}", "it takes about {num} minutes to {v} the {n}",
              "{v} the {n} {num} times a week"]
_ITEM = ["{v} the {n} {mod}", "{v} the {n}", "{v} the {n} with a {aa} {n2}"]
_HEADERS = ["here is what to do", "try these steps", "do it like this"]
_ORD_MID = ["then,", "next,", "after that,"]
_ADVICE = ["my advice is to {v} the {n}", "I would {v} the {n} {mod}", "the best option is a {aa} {n}",
           "I recommend a {aa} {n}"]
_CAUSAL = [", because the {n} gets {pa} otherwise", ", since a {pa} {n} lasts longer", ", because it saves time later",
           ", since that is what the {n} needs"]
_CAUSAL_S = ["the reason is that a {pa} {n} works better"]
_EXAMPLE = ["for example, a {aa} {n} works well", "for instance, try a {aa} {n}", "take the {n}, for example"]
_COST = ["it should not cost much", "check the price before you buy anything", "a cheap {n} is fine",
         "set a budget of about {num} dollars", "it can save you money"]
_SAFETY = ["be careful with the {n}", "wear gloves to stay safe", "turn it off first for safety",
           "there is a small risk if the {n} is {pa}"]
_NAMES_S = ["my friend {P} swears by this", "{P} at a shop in {L} showed me this", "I learned this in {L} last {D}",
            "a {B} {n} works well", "do it on {D} mornings", "{P} from {L} does it every {D}"]
_RESTATE = ["in other words, ", "again, ", "to say it again, "]
_OPEN_COMMA = ["okay,", "right,", "well,", "so,"]
_OPEN_SENT = ["sure.", "good question.", "happy to help."]
_WARM = ["hope this helps.", "good luck!", "take care.", "have fun with it!"]
_OFFER = ["let me know if you need more.", "feel free to ask again.", "happy to help further.",
          "just ask if anything is unclear."]
_PLAIN = ["that should do it.", "that is all there is to it.", "it is not hard.", "most of the time that is enough."]

# generator probabilities; a world's spec may override some under "gen"
_GEN = dict(
    kinds=(("why", 0.25), ("how", 0.25), ("which", 0.25), ("request", 0.25)),
    structure=(("prose", 0.5), ("numbered", 0.25), ("ordinal", 0.25)),
    closer=(("none", 0.4), ("warm", 0.2), ("offer", 0.2), ("plain", 0.2)),
    names=((0, 0.6), (1, 0.3), (2, 0.1)),
    items=((2, 0.5), (3, 0.35), (4, 0.15)), n_prose=((1, 0.5), (2, 0.35), (3, 0.15)),
    hyph=((0.0, 0.5), (0.4, 0.3), (0.8, 0.2)),
    excl=((0.0, 0.6), (0.35, 0.25), (0.8, 0.15)),
    pool=((1, 0.2), (2, 0.3), (3, 0.3), (4, 0.2)),
    p_advice=0.5, p_causal=0.4, p_causal2=0.3, p_example=0.3, p_cost=0.25, p_safety=0.25, p_restate=0.2,
    p_opener=0.4, p_decoy=0.08, drift_max=0.7,
)


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _draw(rng, table):
    vals, probs = zip(*table)
    return vals[int(rng.choice(len(vals), p=np.asarray(probs) / sum(probs)))]


# ----------------------------------------------------------------------------- prompts
def _prompt(rng, gen):
    kind = _draw(rng, gen["kinds"])
    topic = _pick(rng, _TOPIC_NAMES)
    nouns, verbs, padj = _TOPICS[topic]
    n = _pick(rng, nouns)
    n2 = _pick(rng, [x for x in nouns if x != n])
    text = _pick(rng, _PROMPTS[kind]).format(n=n, n2=n2, v=_pick(rng, verbs), pa=_pick(rng, padj),
                                            rel=_pick(rng, _RELS), when=_pick(rng, _WHEN))
    return text[0].upper() + text[1:], topic


# ----------------------------------------------------------------------------- responses
class _Filler:
    """Fills template slots for one response: a small noun pool (repetition), off-topic drift, hyphen rate."""

    def __init__(self, rng, topic, gen):
        self.rng = rng
        self.topic = topic
        nouns = _TOPICS[topic][0]
        k = _draw(rng, gen["pool"])
        self.pool = [nouns[j] for j in rng.choice(len(nouns), size=k, replace=False)]
        self.drift = rng.uniform(0.0, gen["drift_max"])
        self.hyph = _draw(rng, gen["hyph"])

    def noun(self):
        if self.rng.random() < self.drift:
            other = _pick(self.rng, [t for t in _TOPIC_NAMES if t != self.topic])
            return _pick(self.rng, _TOPICS[other][0])
        return _pick(self.rng, self.pool)

    def verb(self):
        if self.rng.random() < 0.6:
            t = self.topic if self.rng.random() >= self.drift else _pick(self.rng, _TOPIC_NAMES)
            return _pick(self.rng, _TOPICS[t][1])
        return _pick(self.rng, _GEN_VERBS)

    def aa(self):
        return _pick(self.rng, _HYPH) if self.rng.random() < self.hyph else _pick(self.rng, _ADJ)

    def fill(self, template):
        rng = self.rng
        if "{mod}" in template:
            template = template.replace("{mod}", _pick(rng, _MODS) if rng.random() < 0.5 else "")
        out = template
        for slot, fn in (("{n}", self.noun), ("{n2}", self.noun), ("{v}", self.verb), ("{aa}", self.aa),
                         ("{pa}", lambda: _pick(rng, _PADJ)), ("{num}", lambda: _pick(rng, _NUMS)),
                         ("{P}", lambda: _pick(rng, _PEOPLE)), ("{L}", lambda: _pick(rng, _PLACES)),
                         ("{D}", lambda: _pick(rng, _DAYS)), ("{B}", lambda: _pick(rng, _BRANDS))):
            while slot in out:
                out = out.replace(slot, fn(), 1)
        return " ".join(out.split())


def _sent(kind, text, end=".", pre=""):
    return {"kind": kind, "text": text, "end": end, "pre": pre}


def _render(sents):
    out, item_no = [], 0
    for s in sents:
        text = s["text"]
        if s["kind"] == "item":
            item_no += 1
            pre = f"{item_no}."
        else:
            pre = s["pre"]
        body = (pre + " " + text) if pre and not pre[0].isdigit() else text
        body = re.sub(r"\bi\b", "I", body)
        body = re.sub(r"\b([Aa]) (?=[aeio]|u(?!se))", r"\1n ", body)
        body = body[0].upper() + body[1:]
        if pre and pre[0].isdigit():
            body = pre + " " + body
        out.append(body + s["end"])
    return " ".join(out)


def _response(rng, topic, gen):
    f = _Filler(rng, topic, gen)
    p_you = rng.uniform()
    p_excl = _draw(rng, gen["excl"])

    def prose():
        r = rng.random()
        if r < p_you:
            return _sent("prose", f.fill(_pick(rng, _PROSE_YOU)))
        if r < p_you + (1 - p_you) * 0.75:
            return _sent("prose", f.fill(_pick(rng, _PROSE_IMP)))
        return _sent("prose", f.fill(_pick(rng, _PROSE_CMD)))

    extras = []
    if rng.random() < gen["p_advice"]:
        extras.append(_sent("advice", f.fill(_pick(rng, _ADVICE))))
    if rng.random() < gen["p_example"]:
        extras.append(_sent("extra", f.fill(_pick(rng, _EXAMPLE))))
    if rng.random() < gen["p_cost"]:
        extras.append(_sent("extra", f.fill(_pick(rng, _COST))))
    if rng.random() < gen["p_safety"]:
        extras.append(_sent("extra", f.fill(_pick(rng, _SAFETY))))
    for _ in range(_draw(rng, gen["names"])):
        extras.append(_sent("extra", f.fill(_pick(rng, _NAMES_S))))
    order = rng.permutation(len(extras))
    extras = [extras[j] for j in order]

    structure = _draw(rng, gen["structure"])
    if structure == "prose":
        body = [prose() for _ in range(_draw(rng, gen["n_prose"]))]
        for e in extras:
            body.insert(int(rng.integers(len(body) + 1)), e)
    else:
        n_items = _draw(rng, gen["items"])
        if structure == "numbered":
            block = [_sent("header", _pick(rng, _HEADERS), end=":")]
            block += [_sent("item", f.fill(_pick(rng, _ITEM))) for _ in range(n_items)]
        else:
            pres = ["first,"] + [_pick(rng, _ORD_MID) for _ in range(n_items - 2)] + ["finally,"]
            block = [_sent("ordinal", f.fill(_pick(rng, _ITEM)), pre=p) for p in pres]
        before = [e for e in extras if rng.random() < 0.5]
        after = [e for e in extras if not any(e is b for b in before)]
        body = before + block + after
    # causal clauses on declarative sentences, or a separate "the reason is" sentence
    if rng.random() < gen["p_causal"]:
        for _ in range(2 if rng.random() < gen["p_causal2"] else 1):
            if rng.random() < 0.2:
                body.insert(int(rng.integers(len(body) + 1)), _sent("extra", f.fill(_pick(rng, _CAUSAL_S))))
                continue
            cand = [s for s in body if s["kind"] in ("prose", "item", "ordinal", "advice") and "," not in s["text"]]
            if cand:
                s = _pick(rng, cand)
                s["text"] += f.fill(_pick(rng, _CAUSAL))
    if rng.random() < gen["p_restate"]:
        cand = [s for s in body if s["kind"] in ("prose", "item", "ordinal")]
        if cand:
            src = _pick(rng, cand)
            body.append(_sent("restate", _pick(rng, _RESTATE) + src["text"]))
    for s in body:
        if s["end"] == "." and rng.random() < p_excl:
            s["end"] = "!"

    head = []
    if rng.random() < gen["p_decoy"]:
        head.append(_sent("decoy", *_split_end(_pick(rng, _WARM + _OFFER))))
    if rng.random() < gen["p_opener"]:
        if rng.random() < 0.5:
            head.append(_sent("opener", *_split_end(_pick(rng, _OPEN_SENT))))
        else:
            first = body[0]
            if first["pre"] and not first["pre"][0].isdigit():
                first["pre"] = _pick(rng, _OPEN_COMMA) + " " + first["pre"]
            elif first["kind"] != "item":
                first["pre"] = _pick(rng, _OPEN_COMMA)
    tail = []
    closer = _draw(rng, gen["closer"])
    if closer != "none":
        tail.append(_sent("closer", *_split_end(_pick(rng, {"warm": _WARM, "offer": _OFFER, "plain": _PLAIN}[closer]))))

    def words():
        return len(_render(head + body + tail).split())

    while words() > 40:  # drop body sentences (keeping two list items, or one), the head, a causal clause, the closer
        items = [s for s in body if s["kind"] in ("item", "ordinal")]
        cand = [s for s in body if s["kind"] not in ("header", "item", "ordinal")]
        if len(items) > 2:
            cand += items[1:-1]
        if len(cand) >= len(body):
            cand = cand[1:]
        if cand:
            victim = _pick(rng, cand)
            body = [s for s in body if s is not victim]
            if body[0]["kind"] == "header" and len([s for s in body if s["kind"] == "item"]) < 1:
                body = body[1:]
        elif head:
            head.pop()
        elif any(re.search(r", (?:because|since) ", s["text"]) for s in body):
            s = [s for s in body if re.search(r", (?:because|since) ", s["text"])][-1]
            s["text"] = re.split(r", (?:because|since) ", s["text"])[0]
        elif tail:
            tail.pop()
        else:
            break
    while words() < 5:
        body.append(prose())
    return _render(head + body + tail)


def _split_end(s):
    return s[:-1], s[-1]


# ----------------------------------------------------------------------------- features (computed from text)
_STOP = set(("the a an and or but to of in on at for with by from is are be it its this that these those you your "
             "my i me we they can should would might will do does did not if so than then also very just about "
             "there here what which how why who when after before every once least some any all most more much "
             "usually best helps need needs have has get gets want try take make sure okay right well again other "
             "words say is was first next finally that").split())
_ADVICE_RE = re.compile(r"\b(my advice is|i would|the best option is|i recommend)\b")
_ORD_RE = re.compile(r"^(?:(?:okay|right|well|so), )?(first|second|next|then|after that|finally),")
_NORM = lambda s: re.sub(r"[.!?:]+$", "", s.strip().lower())  # noqa: E731
_WARM_N, _OFFER_N, _PLAIN_N = ({_NORM(x) for x in xs} for xs in (_WARM, _OFFER, _PLAIN))


def _sentences(s):
    parts, out, carry = re.split(r"(?<=[.!?:])\s+", s.strip()), [], ""
    for p in parts:
        if re.fullmatch(r"\d+\.", p):
            carry = p + " "
            continue
        out.append(carry + p)
        carry = ""
    return out


@lru_cache(maxsize=200_000)
def _feat(s: str) -> dict:
    sents = _sentences(s)
    low = [x.lower() for x in sents]
    toks = re.findall(r"[A-Za-z][A-Za-z'-]*|\d+", s)
    ltoks = [t.lower() for t in toks]
    content = [t for t in ltoks if t.isalpha() and t not in _STOP and len(t) > 2]
    last = _NORM(sents[-1])
    adv = next((j for j, x in enumerate(low) if _ADVICE_RE.search(x)), None)
    return dict(
        warm=float(last in _WARM_N), offer=float(last in _OFFER_N), plain_close=float(last in _PLAIN_N),
        numbered=float(len(re.findall(r"(?:^|\s)\d\.\s", s))),
        ordinal=float(sum(1 for x in low if _ORD_RE.match(x))),
        names=float(sum(1 for t in toks if t in _NAME_SET)),
        hyph=float(sum(1 for t in toks if re.fullmatch(r"[a-z]+(?:-[a-z]+)+", t))),
        redund=(len(content) - len(set(content))) / len(content) if content else 0.0,
        causal=float(sum(1 for t in ltoks if t in ("because", "since", "reason"))),
        cost=float(sum(1 for t in ltoks if t in ("cost", "price", "cheap", "budget", "money", "dollars"))),
        safety=float(sum(1 for t in ltoks if t in ("careful", "safe", "safety", "risk", "gloves"))),
        advice_pos=None if adv is None else (adv / (len(sents) - 1) if len(sents) > 1 else 0.5),
        you=sum(1 for x in low if re.search(r"\b(you|your)\b", x)) / len(sents),
        examples=float(sum(1 for t in ltoks if t in ("example", "instance"))),
        exclaim=float(s.count("!")),
        topic_nouns=tuple(_NOUN_TOPIC[t] for t in ltoks if t in _NOUN_TOPIC),
    )


@lru_cache(maxsize=50_000)
def _prompt_topic(p: str):
    return next((_NOUN_TOPIC[t] for t in re.findall(r"[a-z]+", p.lower()) if t in _NOUN_TOPIC), None)


def _relevance(p, s):
    tn = _feat(s)["topic_nouns"]
    return sum(1 for t in tn if t == _prompt_topic(p)) / len(tn) if tn else 0.0


def _is_why(p):
    return p.lower().startswith("why")


def _cap(x, c):
    return min(float(x), float(c))


def _pos_reward(s, late):
    pos = _feat(s)["advice_pos"]
    if pos is None:
        return 0.0
    return 1.5 * ((2 * pos - 1) if late else (1 - 2 * pos))


def _f(name):
    return lambda s: _feat(s)[name]


_num, _ord, _nam, _hyp = _f("numbered"), _f("ordinal"), _f("names"), _f("hyph")
_cau, _you, _exa = _f("causal"), _f("you"), _f("examples")

# ----------------------------------------------------------------------------- worlds
WORLDS = {
    1: dict(desc="how the answer signs off (its last sentence only; the same phrases as a first sentence are decoys): "
                 "warm wishes ('Hope this helps.') / offers of more help ('Let me know if you need more.') / "
                 "no sign-off at all; equal shares",
            rewards=[lambda p, s: 1.5 * _feat(s)["warm"] - 0.5 * _feat(s)["offer"],
                     lambda p, s: 1.5 * _feat(s)["offer"] - 0.5 * _feat(s)["warm"],
                     lambda p, s: -1.2 * (_feat(s)["warm"] + _feat(s)["offer"])],
            sizes=[20, 20, 20], pairs=(20, 28), flip=0.03, T=0.6),
    2: dict(desc="enumeration: numbered lists ('1. ... 2. ...') / ordinal sequences ('First, ... Then, ... Finally, "
                 "...', dislikes numbered) / plain prose (dislikes both); digits also occur outside lists, 2:1:1",
            rewards=[lambda p, s: 0.6 * _cap(_num(s), 4),
                     lambda p, s: 0.6 * _cap(_ord(s), 4) - 0.3 * _cap(_num(s), 4),
                     lambda p, s: -0.5 * (_cap(_num(s), 4) + _cap(_ord(s), 4))],
            sizes=[28, 14, 14], pairs=(16, 24), flip=0.05, T=0.5),
    3: dict(desc="surface specificity seen only through subwords: capitalised proper names (people, places, days, "
                 "brands) / hyphenated compounds ('long-lasting', 'non-stick') / neither, 4:3:2",
            rewards=[lambda p, s: 0.9 * _cap(_nam(s), 3),
                     lambda p, s: 0.9 * _cap(_hyp(s), 3),
                     lambda p, s: -0.6 * (_cap(_nam(s), 3) + _cap(_hyp(s), 3))],
            sizes=[24, 18, 12], pairs=(24, 32), flip=0.02, T=0.45),
    4: dict(desc="redundancy (share of repeated content words: restatements, reused nouns): a large concise group "
                 "against a small group that likes emphasis by repetition, 10:1",
            rewards=[lambda p, s: -5.0 * _feat(s)["redund"], lambda p, s: 5.0 * _feat(s)["redund"]],
            sizes=[50, 5], pairs=(12, 20), flip=0.04, T=0.35),
    5: dict(desc="a causal word ('because', 'since', 'the reason') liked only when the prompt asks 'why' (and "
                 "disliked otherwise) / liked always / disliked always, 3:2:2",
            rewards=[lambda p, s: (1.2 if _is_why(p) else -1.2) * _cap(_cau(s), 2),
                     lambda p, s: 1.0 * _cap(_cau(s), 2),
                     lambda p, s: -1.0 * _cap(_cau(s), 2)],
            sizes=[24, 16, 16], pairs=(24, 32), flip=0.03, T=0.45,
            gen=dict(kinds=(("why", 0.45), ("how", 0.2), ("which", 0.2), ("request", 0.15)), p_causal=0.55)),
    6: dict(desc="staying on the prompt's topic (share of the answer's nouns from the prompt's topic) / cost remarks "
                 "/ safety remarks / indifferent to all of these (random labels), 3:2:1.5:1",
            rewards=[lambda p, s: 3.0 * _relevance(p, s),
                     lambda p, s: 1.2 * _cap(_feat(s)["cost"], 2),
                     lambda p, s: 1.2 * _cap(_feat(s)["safety"], 2),
                     lambda p, s: 0.0],
            sizes=[24, 16, 12, 8], pairs=(24, 32), flip=0.03, T=0.45, gen=dict(p_cost=0.45, p_safety=0.45)),
    7: dict(desc="position of the advice sentence ('My advice is ...', 'I would ...', 'I recommend ...'): "
                 "early (bottom line first) vs late (advice last); no opinion when there is none; equal shares",
            rewards=[lambda p, s: _pos_reward(s, late=False), lambda p, s: _pos_reward(s, late=True)],
            sizes=[32, 32], pairs=(16, 24), flip=0.0, T=0.8),
    8: dict(desc="2x2 of second-person address (share of sentences with 'you/your') and examples ('for example', "
                 "'for instance'): +you+ex / +you-ex / -you+ex / -you-ex, plus a small group that only likes "
                 "exclamation marks, 18:16:14:12:6",
            rewards=[lambda p, s: 1.5 * (2 * _you(s) - 1) + 1.0 * _cap(_exa(s), 2),
                     lambda p, s: 1.5 * (2 * _you(s) - 1) - 1.0 * _cap(_exa(s), 2),
                     lambda p, s: -1.5 * (2 * _you(s) - 1) + 1.0 * _cap(_exa(s), 2),
                     lambda p, s: -1.5 * (2 * _you(s) - 1) - 1.0 * _cap(_exa(s), 2),
                     lambda p, s: 0.8 * _cap(_feat(s)["exclaim"], 3)],
            sizes=[18, 16, 14, 12, 6], pairs=(26, 32), flip=0.08, T=0.4, gen=dict(p_example=0.45)),
}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def build(i: int, seed: int | None = None) -> tuple[list[dict], dict[str, int], dict]:
    """World i's labelled pairs, each user's true group, and its description with the oracle ARI."""
    from sklearn.metrics import adjusted_rand_score

    spec = WORLDS[i]
    gen = dict(_GEN, **spec.get("gen", {}))
    rng = np.random.default_rng(2000 + i if seed is None else seed)
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(spec["sizes"])])
    rng.shuffle(groups)
    rewards, T, k = spec["rewards"], float(spec["T"]), len(spec["sizes"])
    rows, truth, oracle = [], {}, []
    for u, g in enumerate(groups):
        uid = f"u{u:03d}"
        truth[uid] = int(g)
        ll = np.zeros(k)
        for _ in range(int(rng.integers(spec["pairs"][0], spec["pairs"][1] + 1))):
            p, topic = _prompt(rng, gen)
            a = _response(rng, topic, gen)
            b = _response(rng, topic, gen)
            while b == a:
                b = _response(rng, topic, gen)
            ra, rb = (np.array([r(p, x) for r in rewards]) for x in (a, b))
            a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ra[g] - rb[g]) / T))
            if rng.random() < spec["flip"]:
                a_wins = not a_wins
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append(dict(user_id=uid, prompt=p, chosen=chosen, rejected=rejected))
            ll += _log_sigmoid(((ra - rb) if a_wins else (rb - ra)) / T)
        oracle.append(int(np.argmax(ll)))
    meta = dict(world=i, description=spec["desc"], K=k, sizes=list(spec["sizes"]), pairs_per_user=list(spec["pairs"]),
                flip=spec["flip"], T=spec["T"], oracle_ari=float(adjusted_rand_score(groups, oracle)))
    return rows, truth, meta


def _corpus():
    """Text for the tokenizer: every lexicon word and template, and prompts/responses from every world's generator."""
    words = set()
    for ns, vs, ads in _TOPICS.values():
        words.update(ns + vs + ads)
    for xs in (_GEN_VERBS, _ADJ, _PADJ, _HYPH, _RELS, _WHEN, _NUMS, _PEOPLE, _PLACES, _DAYS, _BRANDS):
        words.update(xs)
    lines = [" ".join(sorted(words))]
    templates = [t for ts in _PROMPTS.values() for t in ts] + _MODS + _PROSE_YOU + _PROSE_IMP + _PROSE_CMD + _ITEM
    templates += _HEADERS + _ORD_MID + _ADVICE + _CAUSAL + _CAUSAL_S + _EXAMPLE + _COST + _SAFETY + _NAMES_S
    templates += _RESTATE + _OPEN_COMMA + _OPEN_SENT + _WARM + _OFFER + _PLAIN
    lines += [re.sub(r"\{\w+\}", "", t) for t in templates]
    rng = np.random.default_rng(12345)
    for i in sorted(WORLDS):
        gen = dict(_GEN, **WORLDS[i].get("gen", {}))
        for _ in range(300):
            p, topic = _prompt(rng, gen)
            lines += [p, _response(rng, topic, gen)]
    return lines


def write_model(directory: str) -> None:
    """A byte-level BPE tokenizer (600 pieces, trained on the worlds' text) and a random one-layer GPT-2."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("<eos>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>",
                                   model_max_length=256)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=32,
                                       n_positions=256, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
