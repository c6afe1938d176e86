"""What the product knows about a task, in one registry.

Evaluation, the baselines and the reports need, per task: its kind (classification, rating,
generation), its label list, the answer budget when decoding, its primary metric, and how one of
a user's history items becomes an example of the task in the task's own prompt format (what OPPU
trains on). They read it here, never from the generator of one data set.

Registered: LaMP's tasks under their published names (`LaMP_1` ... `LaMP_7`, also written
`LaMP-1`), LongLaMP's (generation), and the synthetic benchmark's `tag`, `rate` and `headline`.
Any other task name is inferred from its targets (`infer_task`): all numeric -> rating, few
short distinct labels -> classification over the labels seen in the data, else generation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

CLASSIFICATION, RATING, GENERATION = "classification", "rating", "generation"

# Primary metric and which direction is better, by metric name.
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "mae": False, "rmse": False, "rouge1": True,
                    "rougeL": True, "style_exact": True}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    primary: str  # the metric the report's headline and the personalization effect use
    labels: tuple[str, ...] | None = None  # classification: the fixed list (None: labels seen in the data)
    max_tokens: int = 24  # decoding budget for an answer
    rating_range: tuple[float, float] = (1.0, 5.0)
    # A history item {text, label} -> (input, target) in this task's prompt format; None: not usable.
    item_example: Callable[[dict], tuple[str, str] | None] | None = field(default=None, compare=False)
    # Whether that (input, target) is a question of this very task (tag a movie, score a review), so
    # it may stand beside the task's own questions in training; LaMP-1's and LaMP-7's items, and
    # LongLaMP's, are other questions made from the item (what OPPU trains on, not the task).
    item_is_question: bool = False

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.primary]

    def history_examples(self, history: list[dict]) -> list[tuple[str, str]]:
        """The user's history items of this task, as (input, target) pairs in the task's own format."""
        return [pair for _, pair in self.history_pairs(history)]

    def history_pairs(self, history: list[dict]) -> list[tuple[dict, tuple[str, str]]]:
        """Each usable history item with its (input, target) pair, oldest first."""
        if self.item_example is None:
            return []
        pairs = ((h, self.item_example(h)) for h in sorted(history, key=lambda h: (h["ts"], h["item_id"])))
        return [(h, pair) for h, pair in pairs if pair is not None]


def is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def _labelled(template: str, accepts: Callable[[str], bool] = lambda label: True
              ) -> Callable[[dict], tuple[str, str] | None]:
    """Items whose label `accepts`: input = template on the item's text, target = its label."""

    def example(item: dict) -> tuple[str, str] | None:
        label = item.get("label")
        if label in (None, "") or not accepts(label):
            return None
        return template.format(text=item["text"]), label

    return example


# --- LaMP (LaMP-Benchmark/LaMP: eval/evaluation.py for labels and metrics, PEFT/data/datasets.py
# for the per-item prompts its own per-user fine-tuning uses) ----------------------------------------

LAMP_2_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
               "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
               "violence", "true story")
LAMP_2_PROMPT = ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                 "without further explanation. tags: [" + ", ".join(LAMP_2_TAGS) + "] description: {text}")
LAMP_3_PROMPT = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                 "or 5 without further explanation. review: {text}")


def _lamp_1_item(item: dict) -> tuple[str, str] | None:
    # The importer keeps a paper's abstract as text and its title as label; LaMP's own per-user
    # training asks for the abstract given the title.
    if not item.get("label"):
        return None
    return f"Write an abstract for this title: {item['label']}", item["text"]


def _lamp_7_item(item: dict) -> tuple[str, str] | None:
    # Tweets have no label: LaMP's per-user training completes a tweet from its first words
    # (a random 10-25% there; a fixed fifth here, so runs are reproducible).
    words = item["text"].split()
    if len(words) < 5:
        return None
    cut = max(1, len(words) // 5)
    return "Complete the following tweet: " + " ".join(words[:cut]), " ".join(words[cut:])


LAMP = {
    1: Task("LaMP_1", CLASSIFICATION, "accuracy", labels=("[1]", "[2]"), max_tokens=4, item_example=_lamp_1_item),
    2: Task("LaMP_2", CLASSIFICATION, "accuracy", labels=LAMP_2_TAGS, max_tokens=8,
            item_example=_labelled(LAMP_2_PROMPT, lambda label: label in LAMP_2_TAGS), item_is_question=True),
    3: Task("LaMP_3", RATING, "mae", labels=("1", "2", "3", "4", "5"), max_tokens=4,
            item_example=_labelled(LAMP_3_PROMPT, is_number), item_is_question=True),
    4: Task("LaMP_4", GENERATION, "rouge1", max_tokens=32,
            item_example=_labelled("Generate a headline for the following article: {text}"), item_is_question=True),
    5: Task("LaMP_5", GENERATION, "rouge1", max_tokens=32,
            item_example=_labelled("Generate a title for the following abstract of a paper: {text}"), item_is_question=True),
    6: Task("LaMP_6", GENERATION, "rouge1", max_tokens=32,
            item_example=_labelled("Generate a subject for the following email: {text}"), item_is_question=True),
    7: Task("LaMP_7", GENERATION, "rouge1", max_tokens=48, item_example=_lamp_7_item),
}
_LAMP_NAME = re.compile(r"^(long)?lamp(?:[-_ ]?(\d+))?", re.IGNORECASE)


# --- the synthetic benchmark (p2p.data.synthetic) -----------------------------------------------------

# genre -> three candidate tags (all 18 distinct). A user picks one per genre.
GENRE_TAGS: dict[str, tuple[str, str, str]] = {
    "space": ("scifi", "cosmic", "futuristic"),
    "crime": ("noir", "heist", "gritty"),
    "romance": ("romantic", "sentimental", "sweet"),
    "war": ("historical", "epic", "brutal"),
    "comedy": ("witty", "silly", "hilarious"),
    "horror": ("scary", "creepy", "gory"),
}
GENRES = tuple(GENRE_TAGS)
TAGS = tuple(t for tags in GENRE_TAGS.values() for t in tags)

# The instruction each example's input carries (LaMP's inputs carry theirs too), so a base
# model and the prompt baseline know what is asked; history items hold the bare text.
INSTRUCTIONS = {
    "tag": "Which tag fits this movie? Answer with one of: " + ", ".join(TAGS) + ".\nMovie: {text}",
    "rate": "Score this review from 1 to 5. Answer with the number only.\nReview: {text}",
    "headline": "Write a headline for this news text.\nText: {text}",
}


def _synthetic_tasks() -> dict[str, Task]:

    tags = frozenset(TAGS)

    def headline(label: str) -> bool:
        return label not in tags and not is_number(label)

    return {
        "tag": Task("tag", CLASSIFICATION, "accuracy", labels=TAGS, max_tokens=8,
                    item_example=_labelled(INSTRUCTIONS["tag"], tags.__contains__), item_is_question=True),
        "rate": Task("rate", RATING, "mae", labels=("1", "2", "3", "4", "5"), max_tokens=4,
                     item_example=_labelled(INSTRUCTIONS["rate"], is_number), item_is_question=True),
        # The user's style (prefix, casing, closing mark) is the personal signal; ROUGE lowercases
        # and drops punctuation, so it cannot see it: the primary metric is the exact style match.
        "headline": Task("headline", GENERATION, "style_exact", max_tokens=24,
                         item_example=_labelled(INSTRUCTIONS["headline"], headline), item_is_question=True),
    }


def task_for(name: str, targets: list[str] | None = None) -> Task:
    """The registered task of this name, or one inferred from its targets."""
    synthetic = _synthetic_tasks()
    if name in synthetic:
        return synthetic[name]
    m = _LAMP_NAME.match(name)
    if m and m.group(1):  # LongLaMP: long-form generation, ROUGE
        return Task(name, GENERATION, "rouge1", max_tokens=256, item_example=_labelled("{text}"))
    if m and m.group(2) and int(m.group(2)) in LAMP:
        return replace(LAMP[int(m.group(2))], name=name)
    return infer_task(name, targets or [])


def infer_task(name: str, targets: list[str]) -> Task:
    """A task the registry does not know, from its targets: rating, classification or generation."""
    if targets and all(is_number(t) for t in targets):
        low, high = min(float(t) for t in targets), max(float(t) for t in targets)
        return Task(name, RATING, "mae", max_tokens=4, rating_range=(low, high),
                    item_example=_labelled("{text}", is_number))
    distinct = sorted({t.strip() for t in targets})
    if targets and len(distinct) <= 50 and all(len(t.split()) <= 3 for t in distinct):
        return Task(name, CLASSIFICATION, "accuracy", labels=tuple(distinct), max_tokens=8,
                    item_example=_labelled("{text}", set(distinct).__contains__))
    return Task(name, GENERATION, "rouge1", max_tokens=48, item_example=_labelled("{text}"))


def tasks_of(examples: list[dict]) -> dict[str, Task]:
    """Each task named in `examples`, with its targets to infer the ones the registry lacks."""
    targets: dict[str, list[str]] = {}
    for e in examples:
        targets.setdefault(e["task"], []).append(e["target"])
    return {name: task_for(name, t) for name, t in targets.items()}
