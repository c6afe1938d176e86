"""A synthetic personalization benchmark where the profile is necessary and sufficient (version 2).

Every user has hidden persona attributes; their history and their examples are generated from
them, with noise. Three tasks, shaped like LaMP:

- `tag` (LaMP-2): an item description -> one tag. Each genre has three candidate tags and each
  user privately prefers one per genre, so the input alone gives about 1/3; the user's history
  shows which tag they use for which genre.
- `rate` (LaMP-3): a review -> a 1-5 score: the review's sentiment shifted by the user's strictness,
  and pushed to the ends of the scale (2 -> 1, 4 -> 5) by users who rate in extremes.
- `headline` (LaMP-4/7): a news text -> a headline in the user's style (prefix word, casing,
  closing mark). The style is the personal signal; the metric that sees it is the exact,
  case-sensitive style match (`p2p.evaluation.metrics.headline_style`).

Out of distribution, per task: each task depends on a few persona attributes (tag: the six
per-genre choices; rate: strictness and extremity; headline: prefix, casing and ending). For every
task a seeded ~15% of the combinations of those values is reserved: `test_ood` users have a
reserved combination for every task, all other users have none. An OOD user therefore needs, for
each task, an adapter no training user needed (each single value was seen; the combination was
not).

Besides `users/` and `examples/`, the writer puts `reference/` (per example: the input-only
rule's answer and the persona-known answer, the ceiling) and `synthetic.json` (version, seed,
reserved combinations) next to them; evaluation reads them as data, not as code.

Generation is chunked and each chunk has its own seeded RNG, so output is identical for a seed
whatever the chunk size, and 1M users run in bounded memory.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import os
import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from p2p.data.schemas import EXAMPLES, REFERENCE, USERS
from p2p.task.registry import GENRE_TAGS, GENRES, INSTRUCTIONS

VERSION = 2
TASKS = ("tag", "rate", "headline")


_SUBJECTS = {
    "space": ["a crew of astronauts", "a lone pilot", "a rogue android", "two rival starship captains",
              "a young engineer on a mining colony", "the last survivors of an orbital station",
              "a stranded cosmonaut", "an alien diplomat"],
    "crime": ["a retired detective", "a gang of bank robbers", "a corrupt police chief", "an undercover agent",
              "a safecracker with one last job", "a small-town sheriff", "a mob accountant", "a getaway driver"],
    "romance": ["two strangers on a night train", "a florist and a struggling musician", "childhood sweethearts",
                "a widowed baker", "two rival wedding planners", "a shy librarian", "pen pals who never met",
                "a couple in a long-distance marriage"],
    "war": ["a platoon of young soldiers", "a field nurse", "a resistance courier", "a submarine crew",
            "two brothers on opposite sides", "a general facing defeat", "a codebreaker",
            "villagers caught behind the front line"],
    "comedy": ["a clumsy substitute teacher", "three roommates", "a failed stand-up comedian",
               "an overconfident wedding DJ", "a family on a disastrous road trip", "a talking parrot",
               "two dads at a school fair", "an office intern"],
    "horror": ["a family in an old farmhouse", "a group of campers", "a night-shift nurse",
               "a paranormal investigator", "twins in a boarding school", "a lighthouse keeper",
               "a babysitter alone for the weekend", "a priest in a remote village"],
}
_ACTIONS = {
    "space": ["drift toward a dying star", "intercept a signal from a frozen moon", "race to repair a failing reactor",
              "uncover a secret buried in the ship's computer", "land on a planet that should not exist",
              "fight to keep the colony's oxygen running"],
    "crime": ["plan the robbery of a downtown vault", "chase a killer through rain-soaked streets",
              "try to clear a framed partner", "launder money for the wrong people",
              "follow a trail of stolen diamonds", "hide evidence from a relentless inspector"],
    "romance": ["fall in love over one summer", "keep meeting by accident", "write letters they never send",
                "rebuild a friendship that became something more", "choose between love and a dream job",
                "plan a wedding that keeps falling apart"],
    "war": ["hold a bridge against impossible odds", "smuggle refugees across the border",
            "survive a winter siege", "carry a message through enemy lines", "rebuild after the bombing",
            "face the truth about a lost battle"],
    "comedy": ["accidentally become famous overnight", "try to cover up a tiny lie that keeps growing",
               "host the worst dinner party in history", "compete in a ridiculous cooking contest",
               "swap lives for a chaotic week", "get stuck in an elevator with their boss"],
    "horror": ["hear scratching inside the walls", "find a diary that writes itself",
               "are hunted by something in the woods", "wake up to the same nightmare every night",
               "open a door that was sealed for a century", "notice their reflections moving on their own"],
}
_EXTRAS = {
    "space": ["light-years from home", "before the oxygen runs out", "while the stars go dark one by one",
              "as the mission clock ticks down"],
    "crime": ["in a city where nobody can be trusted", "before the deal goes wrong", "during one long night",
              "with the police one step behind"],
    "romance": ["in a small seaside town", "against the wishes of their families", "across two continents",
                "one letter at a time"],
    "war": ["in the final months of the war", "behind enemy lines", "as the front collapses",
            "under constant shelling"],
    "comedy": ["with hilarious consequences", "and everything goes wrong", "in front of the whole town",
               "with a very stubborn goat"],
    "horror": ["after midnight", "as the fog rolls in", "while the power is out", "in a house that remembers"],
}
_PLURAL_START = ("two", "three", "childhood", "villagers", "pen", "twins")
_TAG_TEMPLATES = [
    "{S} {a} {e}. A {g} film.",
    "In this {g} film, {s} {a}.",
    "{S} {a}, {e}, in a {g} story told with care.",
    "A {g} story in which {s} {a} {e}.",
    "When {s} {a}, nothing stays the same in this {g} drama.",
    "Follow {s} as they {a} {e}: {g} at its most intense.",
    "{E}, {s} {a}. Classic {g}.",
    "The {g} movie follows {s} who {a}.",
]

_PRODUCTS = ["blender", "pair of headphones", "backpack", "coffee grinder", "desk lamp", "running shoe",
             "phone case", "electric kettle", "office chair", "bluetooth speaker", "rain jacket", "toaster",
             "yoga mat", "water bottle", "keyboard", "camping tent"]
SENTIMENT_PHRASES = {  # review sentences per sentiment 1-5 (bench/lamp_shaped.py writes its reviews with them too)
    1: ["It broke after two days and support never answered.", "Honestly a complete waste of money.",
        "Terrible quality, I returned it the same week.", "Awful. Nothing about it works as promised."],
    2: ["It works, but it feels cheap and flimsy.", "Disappointing for the price.",
        "Several small problems add up to a frustrating experience.", "Not great; I expected much more."],
    3: ["It is fine, nothing special.", "Does the job, with a few quirks.", "Average quality for an average price.",
        "Some things I like, some I don't."],
    4: ["Solid build and works well.", "Really good value, a few minor flaws.", "I am happy with it overall.",
        "Good quality and easy to use."],
    5: ["Absolutely perfect, I use it every day.", "Outstanding quality, exceeded every expectation.",
        "The best purchase I made this year.", "Flawless. I would buy it again in a heartbeat."],
}
_REVIEW_TEMPLATES = [
    "I bought this {p} last {t}. {s}",
    "{s} That is my verdict on this {p}.",
    "Used the {p} for a {t} now. {s}",
    "Review of the {p}: {s}",
    "My partner picked this {p} for me. {s}",
    "After a {t} with this {p}: {s}",
]
_TIMES = ["week", "month", "year", "summer", "winter"]

_ACTORS = ["the city council", "local firefighters", "a startup", "the national bank", "scientists",
           "the school board", "a museum", "farmers", "the football club", "residents", "the mayor",
           "engineers", "hospital staff", "a charity"]
_EVENTS = [("approved a new budget for", "approve budget for"), ("opened a new center in", "open center in"),
           ("protested against plans in", "protest plans in"), ("discovered a rare fossil near", "find fossil near"),
           ("launched a recycling program in", "launch recycling in"), ("won a national award in", "win award in"),
           ("reported record growth in", "report record growth in"), ("cleaned up the river in", "clean river in"),
           ("held a charity run in", "hold charity run in"), ("warned of flooding in", "warn of flooding in")]
_PLACES = ["Springfield", "the old harbor", "the north district", "Riverside", "the market square", "Oakdale",
           "the university campus", "Lakeview", "the industrial zone", "Hillcrest"]
_DETAILS = ["after months of debate", "despite heavy rain", "drawing a large crowd", "to mixed reactions",
            "ahead of the holidays", "with support from volunteers", "surprising many observers"]
_NEWS_TEMPLATES = [
    "On {d}, {a} {ev} {pl}, {de}.",
    "{A} {ev} {pl} {de}, officials said on {d}.",
    "In a move announced {d}, {a} {ev} {pl}.",
    "{A} {ev} {pl} on {d}; the decision came {de}.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend"]

HEADLINE_PREFIXES = ("", "Breaking:", "Update:", "Local:")
HEADLINE_CASINGS = ("title", "lower", "sentence")
HEADLINE_ENDINGS = ("", "!", "?")

SPLIT_WEIGHTS = (("train", 0.7), ("val", 0.1), ("test_id", 0.1), ("test_ood", 0.1))
TS_START = 1_672_531_200  # 2023-01-01


@dataclass(frozen=True)
class Persona:
    """The hidden attributes behind a user's history and answers."""

    tag_choice: tuple[int, ...]  # per genre, index into its three tags
    strictness: int  # -1 harsh, 0 neutral, +1 generous
    extreme: bool  # rates in extremes: a 2 becomes 1, a 4 becomes 5
    prefix: int
    casing: int
    ending: int
    genre_weights: tuple[float, ...] = field(compare=False)

    def task_key(self, task: str) -> tuple:
        """The attribute values `task` depends on: what makes a user need a different adapter for it."""
        if task == "tag":
            return self.tag_choice
        if task == "rate":
            return (self.strictness, self.extreme)
        return (self.prefix, self.casing, self.ending)


@dataclass
class SyntheticUser:
    user_id: str
    split: str
    persona: Persona
    history: list[dict]
    examples: list[dict]  # each also carries "genre"/"sentiment"/"plain" for rules measured in tests


def task_combinations(task: str) -> list[tuple]:
    if task == "tag":
        return list(itertools.product(range(3), repeat=len(GENRES)))
    if task == "rate":
        return list(itertools.product((-1, 0, 1), (False, True)))
    return list(itertools.product(range(len(HEADLINE_PREFIXES)), range(len(HEADLINE_CASINGS)),
                                  range(len(HEADLINE_ENDINGS))))


OOD_SHARE = 0.15


@functools.cache
def reserved_combinations(seed: int) -> dict[str, frozenset]:
    """Per task, the combinations only `test_ood` users have (a seeded ~15%, at least one)."""
    out = {}
    for task in TASKS:
        combos = task_combinations(task)
        rng = random.Random(f"p2p-synth-ood:{seed}:{task}")
        out[task] = frozenset(rng.sample(combos, max(1, round(OOD_SHARE * len(combos)))))
    return out


def is_ood(persona: Persona, task: str, seed: int) -> bool:
    return persona.task_key(task) in reserved_combinations(seed)[task]


def _sample_persona(rng: random.Random, ood: bool, seed: int, tasks: tuple[str, ...]) -> Persona:
    """A persona whose every task's combination is reserved (ood) or none is (not ood)."""
    interests = rng.sample(range(len(GENRES)), 3)
    weights = [0.04] * len(GENRES)
    for g, w in zip(interests, (0.45, 0.3, 0.2), strict=True):
        weights[g] = w
    reserved = reserved_combinations(seed)

    def draw(task: str, sample) -> tuple:
        while True:
            key = sample()
            if task not in tasks or (key in reserved[task]) == ood:
                return key

    tag = draw("tag", lambda: tuple(rng.randrange(3) for _ in GENRES))
    strictness, extreme = draw("rate", lambda: (rng.choice((-1, 0, 1)), rng.random() < 0.5))
    prefix, casing, ending = draw("headline", lambda: (rng.randrange(len(HEADLINE_PREFIXES)),
                                                      rng.randrange(len(HEADLINE_CASINGS)),
                                                      rng.randrange(len(HEADLINE_ENDINGS))))
    return Persona(tag_choice=tag, strictness=strictness, extreme=extreme, prefix=prefix, casing=casing,
                   ending=ending, genre_weights=tuple(weights))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _third_person(action: str) -> str:
    """'drift toward' -> 'drifts toward', 'carry' -> 'carries', 'are hunted' -> 'is hunted'."""
    verb, _, rest = action.partition(" ")
    if verb == "are":
        verb = "is"
    elif verb.endswith("y") and verb[-2:-1] not in "aeiou":
        verb = verb[:-1] + "ies"
    elif verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        verb += "es"
    else:
        verb += "s"
    return f"{verb} {rest}".strip()


def _is_plural(subject: str) -> bool:
    return subject.split()[0] in _PLURAL_START or subject.startswith(("the last", "a florist and"))


def item_description(rng: random.Random, genre: str) -> str:
    s, a, e = rng.choice(_SUBJECTS[genre]), rng.choice(_ACTIONS[genre]), rng.choice(_EXTRAS[genre])
    template = rng.choice(_TAG_TEMPLATES)
    if "{a}" in template and "they {a}" not in template and not _is_plural(s):
        a = _third_person(a)
    return template.format(s=s, S=_cap(s), a=a, e=e, E=_cap(e), g=genre)


def user_tag(persona: Persona, genre: str) -> str:
    return GENRE_TAGS[genre][persona.tag_choice[GENRES.index(genre)]]


def user_score(persona: Persona, sentiment: int) -> int:
    score = min(5, max(1, sentiment + persona.strictness))
    return {2: 1, 4: 5}.get(score, score) if persona.extreme else score


def review_text(rng: random.Random, sentiment: int) -> str:
    return rng.choice(_REVIEW_TEMPLATES).format(
        p=rng.choice(_PRODUCTS), t=rng.choice(_TIMES), s=rng.choice(SENTIMENT_PHRASES[sentiment])
    )


def news_item(rng: random.Random) -> tuple[str, str]:
    """A news text and its plain headline (before a user's style is applied)."""
    actor, (event, short), place = rng.choice(_ACTORS), rng.choice(_EVENTS), rng.choice(_PLACES)
    text = rng.choice(_NEWS_TEMPLATES).format(
        a=actor, A=_cap(actor), ev=event, pl=place, de=rng.choice(_DETAILS), d=rng.choice(_DAYS)
    )
    return text, f"{actor.removeprefix('the ').removeprefix('a ')} {short} {place.removeprefix('the ')}"


def styled_headline(persona: Persona, plain: str) -> str:
    casing = HEADLINE_CASINGS[persona.casing]
    if casing == "title":
        words = [w if w in ("in", "of", "for", "near") else _cap(w) for w in plain.split()]
        text = " ".join(words)
    elif casing == "lower":
        text = plain.lower()
    else:
        text = _cap(plain)
    prefix = HEADLINE_PREFIXES[persona.prefix]
    return (f"{prefix} {text}" if prefix else text) + HEADLINE_ENDINGS[persona.ending]




def _noisy(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _task_item(rng: random.Random, persona: Persona, task: str, noise: float, genre: str | None = None) -> dict:
    """One (text, answer) pair of `task` for this persona, with the facts rules may read.

    `genre` fixes a tag item's genre (a query about a genre the user has watched); by default it
    is drawn from the user's interests.
    """
    if task == "tag":
        genre = genre or rng.choices(GENRES, weights=persona.genre_weights)[0]
        label = user_tag(persona, genre)
        if _noisy(rng, noise):
            label = rng.choice([t for t in GENRE_TAGS[genre] if t != label])
        return {"text": item_description(rng, genre), "label": label, "genre": genre,
                "ceiling": user_tag(persona, genre)}
    if task == "rate":
        sentiment = rng.randint(1, 5)
        score = user_score(persona, sentiment)
        if _noisy(rng, noise):
            score = min(5, max(1, score + rng.choice((-1, 1))))
        return {"text": review_text(rng, sentiment), "label": str(score), "sentiment": sentiment,
                "ceiling": str(user_score(persona, sentiment))}
    text, plain = news_item(rng)
    return {"text": text, "label": styled_headline(persona, plain), "plain": plain,
            "ceiling": styled_headline(persona, plain)}


def _sample_split(rng: random.Random) -> str:
    r, acc = rng.random(), 0.0
    for name, w in SPLIT_WEIGHTS:
        acc += w
        if r < acc:
            return name
    return SPLIT_WEIGHTS[-1][0]


def _activity(rng: random.Random, low: int = 8, high: int = 64) -> int:
    """History length per task, log-uniform in [low, high]: many light users, some heavy ones."""
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def generate_chunk(
    chunk: int, chunk_size: int, n_users: int, seed: int, tasks: tuple[str, ...] = TASKS,
    examples_per_task: int = 4, noise: float = 0.03,
) -> list[SyntheticUser]:
    """Users [chunk*chunk_size, ...): their own RNG, so chunks are independent and reproducible."""
    users = []
    for index in range(chunk * chunk_size, min(n_users, (chunk + 1) * chunk_size)):
        rng = random.Random(f"p2p-synth-v{VERSION}:{seed}:{index}")
        split = _sample_split(rng)
        persona = _sample_persona(rng, split == "test_ood", seed, tasks)
        user_id = f"u{index:07d}"
        n = _activity(rng)
        history, examples = [], []
        ts = TS_START + rng.randrange(86_400 * 365)
        for task in tasks:
            genres = []
            for j in range(n):
                item = _task_item(rng, persona, task, noise)
                ts += rng.randrange(3_600, 86_400 * 7)
                history.append({"item_id": f"{user_id}-{task}-{j}", "text": item["text"],
                                "label": item["label"], "ts": ts})
                genres.append(item.get("genre"))
            for j in range(examples_per_task):
                # Users tag what they watch: a tag query's genre is one they have history in.
                item = _task_item(rng, persona, task, noise, genre=rng.choice(genres) if task == "tag" else None)
                examples.append({"example_id": f"{user_id}-{task}-e{j}", "user_id": user_id, "task": task,
                                 "input": INSTRUCTIONS[task].format(text=item["text"]), "target": item["label"],
                                 "split": split,
                                 **{k: item[k] for k in ("genre", "sentiment", "plain", "ceiling") if k in item}})
        users.append(SyntheticUser(user_id, split, persona, history, examples))
    return users


def users_table(users: list[SyntheticUser]) -> pa.Table:
    return pa.table(
        {
            "user_id": [u.user_id for u in users],
            "history": pa.array([u.history for u in users], type=USERS.field("history").type),
            "updated_at": [max((h["ts"] for h in u.history), default=TS_START) for u in users],
        },
        schema=USERS,
    )


def examples_table(users: list[SyntheticUser]) -> pa.Table:
    rows = [e for u in users for e in u.examples]
    return pa.table({name: [r[name] for r in rows] for name in EXAMPLES.names}, schema=EXAMPLES)


def _rule(example: dict) -> tuple[str, str | None]:
    """(rule_key, rule answer) of the best rule that sees only the input.

    tag: the genre (evaluation answers the genre's majority tag among training users); rate: the
    review's sentiment as the score; headline: the plain headline, no style.
    """
    if example["task"] == "tag":
        return example["genre"], None
    if example["task"] == "rate":
        return str(example["sentiment"]), str(example["sentiment"])
    return example["plain"], example["plain"]


def reference_table(users: list[SyntheticUser]) -> pa.Table:
    rows = []
    for u in users:
        for e in u.examples:
            key, answer = _rule(e)
            rows.append({"example_id": e["example_id"], "rule_key": key, "rule": answer, "ceiling": e["ceiling"]})
    return pa.Table.from_pylist(rows, schema=REFERENCE)


def _write_chunk(job: tuple) -> tuple[dict[str, int], int]:
    out, chunk, chunk_size, n_users, seed, tasks = job
    users = generate_chunk(chunk, chunk_size, n_users, seed, tasks)
    name = f"part-{chunk:05d}.parquet"
    pq.write_table(users_table(users), os.path.join(out, "users", name))
    ex = examples_table(users)
    pq.write_table(ex, os.path.join(out, "examples", name))
    pq.write_table(reference_table(users), os.path.join(out, "reference", name))
    counts: dict[str, int] = {}
    for u in users:
        counts[u.split] = counts.get(u.split, 0) + 1
    return counts, len(ex)


def write_synthetic(out: str, n_users: int, seed: int = 0, tasks: tuple[str, ...] = TASKS,
                    chunk_size: int = 5000, workers: int = 1, progress=None) -> dict:
    """Write `out/{users,examples,reference}/part-*.parquet` and `out/synthetic.json`; return counts.

    Chunks are independent, so `workers` processes generate them in parallel; each holds one
    chunk at a time, so memory stays bounded for any number of users.
    """
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown task {bad[0] if bad else ''!r}; valid: {', '.join(TASKS)}")
    if n_users <= 0:
        raise ValueError(f"--users must be positive, got {n_users}")
    for sub in ("users", "examples", "reference"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    reserved = reserved_combinations(seed)
    with open(os.path.join(out, "synthetic.json"), "w") as f:
        json.dump({"version": VERSION, "seed": seed, "users": n_users, "tasks": list(tasks),
                   "reserved_for_test_ood": {t: sorted(map(list, reserved[t])) for t in tasks}}, f, indent=1)
    jobs = [(out, c, chunk_size, n_users, seed, tuple(tasks)) for c in range(math.ceil(n_users / chunk_size))]
    counts = {s: 0 for s, _ in SPLIT_WEIGHTS}
    n_examples = 0
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_write_chunk, jobs) if pool else map(_write_chunk, jobs)
        for job, (chunk_counts, n_ex) in zip(jobs, results, strict=True):
            for k, v in chunk_counts.items():
                counts[k] += v
            n_examples += n_ex
            if progress is not None:
                progress(min(chunk_size, n_users - job[1] * chunk_size))
    finally:
        if pool:
            pool.terminate()
    return {"users": n_users, "examples": n_examples, "splits": counts}
