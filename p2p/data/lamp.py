"""Import the published LaMP / LongLaMP files into our `users` and `examples` tables.

Questions file: a JSON list of `{id, input, profile: [...]}`; outputs file:
`{task, golds: [{id, output}]}`. Each question is one user (LaMP's user-based split), whose
history is its profile. Profile items carry task-specific fields; we map them to
(text, label): the field a user *writes about* becomes `text`, the field they *answer with*
(tag, score, category, title, ...) becomes `label`.

LaMP gives one question per user, too few for a hypernet to learn how a user's history bends the
answer. `history_examples=K` (training split only) turns each user's K most recent usable history
items into more questions of the same task, in the task's own prompt format (`Task.item_example`,
what OPPU trains on), and takes them out of that user's profile, so no question's answer is in the
profile it is asked with; at least one usable item stays in every profile. Only for tasks whose
history items are questions of the task itself (`Task.item_is_question`: LaMP-2 to LaMP-6): a LaMP-1
or LaMP-7 item, or a LongLaMP one, would be a different question under the task's name.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa

from p2p.data.schemas import EXAMPLES, SPLITS, USERS, DataError, validate, write_table
from p2p.task.registry import Task, task_for

# Fields a profile item's answer may live in, by preference; `title` is a label only when the
# item has another text field (LaMP-4/5 headline and title generation), else it is the text.
LABEL_FIELDS = ("tag", "category", "score", "overall", "title", "summary")
TEXT_FIELDS = ("text", "description", "abstract", "reviewText", "content")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def profile_item_to_history(item: dict, index: int, qid: str, source: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{source}: id {qid!r}: profile item {index} is not an object")
    text_field = next((f for f in TEXT_FIELDS if item.get(f) not in (None, "")), None)
    label_field = next(
        (f for f in LABEL_FIELDS if item.get(f) not in (None, "") and (f != "title" or text_field)), None
    )
    if text_field is None:
        text_field = "title" if item.get("title") else None
    if text_field is None:
        raise DataError(
            f"{source}: id {qid!r}: profile item {index} has none of the text fields "
            f"{', '.join(TEXT_FIELDS + ('title',))}"
        )
    text = str(item[text_field])
    if text_field != "title" and label_field != "title" and item.get("title"):
        text = f"{item['title']}: {text}"
    return {
        "item_id": str(item.get("id", f"{qid}-p{index}")),
        "text": text,
        "label": None if label_field is None else str(item[label_field]),
        "ts": _timestamp(item.get("date"), index),
    }


def _timestamp(value, index: int) -> int:
    if value is None:
        return index
    if isinstance(value, int | float):
        return int(value)
    for fmt in ("%Y-%m-%d", "%Y-%m-%d %H:%M:%S", "%B %d, %Y", "%m %d, %Y"):
        try:
            return int(dt.datetime.strptime(str(value), fmt).replace(tzinfo=dt.UTC).timestamp())
        except ValueError:
            continue
    return index


def split_history(history: list[dict], task: Task, count: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """The user's `count` most recent items the task can ask about, as (input, target) questions,
    and the history without them (the profile those questions are asked with). One usable item
    always stays: a profile emptied by its own questions would teach the hypernet nothing."""
    pairs = task.history_pairs(history)
    take = min(count, len(pairs) - 1)
    if take <= 0:
        return history, []
    asked = pairs[-take:]
    gone = {id(item) for item, _ in asked}
    return [h for h in history if id(h) not in gone], [pair for _, pair in asked]


def import_lamp(questions_path: str, outputs_path: str, split: str, out_dir: str,
                history_examples: int = 0) -> dict:
    """Write `out_dir/users/<task>-<split>.parquet` and `out_dir/examples/...`; return counts."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if history_examples < 0:
        raise DataError(f"--history-examples must be 0 or more, got {history_examples}")
    if history_examples and split != "train":
        raise DataError(f"--history-examples is for --split train only (got {split!r}): held-out users "
                        "are asked their own question with their whole profile")
    questions = _load_json(questions_path)
    outputs = _load_json(outputs_path)
    if not isinstance(questions, list):
        raise DataError(f"{questions_path}: expected a JSON list of questions, found {type(questions).__name__}")
    if not isinstance(outputs, dict) or "golds" not in outputs:
        raise DataError(f"{outputs_path}: expected an object with keys 'task' and 'golds'")
    task = str(outputs.get("task", "lamp"))
    golds = {}
    for i, g in enumerate(outputs["golds"]):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise DataError(f"{outputs_path}: golds[{i}] needs keys 'id' and 'output'")
        golds[str(g["id"])] = str(g["output"])

    task_spec = task_for(task, list(golds.values()))
    if history_examples and not task_spec.item_is_question:
        raise DataError(f"--history-examples: task {task!r} ({outputs_path}) is not one whose history items are "
                        "its own questions (LaMP_2 to LaMP_6)")
    users, examples, from_history = [], [], 0
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            raise DataError(f"{questions_path}: question {i} is not an object")
        qid = str(q.get("id", f"#{i}"))
        for key in ("id", "input", "profile"):
            if key not in q:
                raise DataError(f"{questions_path}: id {qid!r} (question {i}) is missing key {key!r}")
        if qid not in golds:
            raise DataError(f"{outputs_path}: no gold output for id {qid!r} (from {questions_path})")
        if not isinstance(q["profile"], list):
            raise DataError(f"{questions_path}: id {qid!r}: 'profile' must be a list")
        history = [profile_item_to_history(p, j, qid, questions_path) for j, p in enumerate(q["profile"])]
        history, asked = split_history(history, task_spec, history_examples)
        from_history += len(asked)
        examples += [{"example_id": f"{qid}-h{j}", "user_id": qid, "task": task, "input": inp, "target": target,
                      "split": split} for j, (inp, target) in enumerate(asked)]
        users.append({"user_id": qid, "history": history,
                      "updated_at": max((h["ts"] for h in history), default=0)})
        examples.append({"example_id": qid, "user_id": qid, "task": task, "input": str(q["input"]),
                         "target": golds[qid], "split": split})

    name = f"{task}-{split}".replace("/", "_")
    users_t = validate(pa.Table.from_pylist(users, schema=USERS), "users", questions_path)
    examples_t = validate(pa.Table.from_pylist(examples, schema=EXAMPLES), "examples", questions_path)
    write_table(users_t, os.path.join(out_dir, "users", f"{name}.parquet"), "users")
    write_table(examples_t, os.path.join(out_dir, "examples", f"{name}.parquet"), "examples")
    return {"task": task, "users": len(users), "examples": len(examples), "from_history": from_history}
