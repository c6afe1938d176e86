"""Many clients of mixed users against `p2p serve` while it is hurt; loopback only, bounded in time.

    python -m bench.serve_faults [--seconds 90] [--clients 8] [--users 24] [--replicas 2]

Two replicas of a tiny-random base (adapters large enough that every user's greedy answer differs
from every other's, so an answer made with another user's adapter is caught), clients streaming and
not, each request a random user. During the run, at fixed shares of `--seconds`:

- 20%: one replica's process is killed (SIGKILL); Serve starts a new one;
- 35%: a few users are deleted through the API;
- 50%: a refresh commits a new run in which some users have new adapters;
- 65%: the store directory vanishes for 10% of the run (renamed away), then comes back.

Every answer is checked against the tokens decoded in this process: the user's adapter (before or
after the refresh), or the base model (a deleted user, or a user whose adapter cannot be read). An
answer equal to *another* user's is `wrong user` (the only acceptable count is 0); one equal to
nobody's is `unexplained`. Reports requests sent / answered / failed by status, p50/p99 latency,
the replicas' RSS over time, and how long Serve took to have all replicas running again.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import tempfile
import threading
import time

import numpy as np
import psutil
import requests

from bench.report import write
from bench.serve import build_store, deploy, start_serve
from p2p.generation.decoding import decode
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.personalize import Personalizer

PROMPT = "Which tag fits this movie: a haunted house at night?"
TOKENS = 12


class Expected:
    """What each user's answer may be at any moment, computed in this process."""

    def __init__(self, hypernet, users: list[str], embeddings: np.ndarray):
        model, self.tok = load_base_model("tiny-random")
        self.adapted = AdaptedModel(model, self.tok, hypernet.config)
        self.prompt = self.tok(PROMPT, add_special_tokens=False)["input_ids"]
        self.base = self._tokens(None)
        self.by_user = {u: {self._tokens(a)} for u, a in zip(users, hypernet.user_adapters(embeddings), strict=True)}
        self.texts = {u: {self._text(t) for t in ts} for u, ts in self.by_user.items()}  # streams carry text
        self.base_text = self._text(self.base)

    def _tokens(self, adapter) -> tuple[int, ...]:
        return tuple(decode(self.adapted, [self.prompt], [TOKENS], [adapter]).tokens[0])

    def add(self, user: str, adapter) -> None:
        tokens = self._tokens(adapter)  # new sets, swapped in whole: client threads read them meanwhile
        self.by_user[user] = self.by_user[user] | {tokens}
        self.texts[user] = self.texts[user] | {self._text(tokens)}

    def verdict(self, user: str, tokens: tuple[int, ...]) -> str:
        if tokens in self.by_user[user]:
            return "own adapter"
        if tokens == self.base:
            return "base model"
        if any(tokens in answers for other, answers in self.by_user.items() if other != user):
            return "wrong user"
        return "unexplained"

    def text_verdict(self, user: str, text: str) -> str:
        """`verdict` for a streamed answer, which carries text, not token ids."""
        if text in self.texts[user]:
            return "own adapter"
        if text == self.base_text:
            return "base model"
        return "wrong user" if any(text in ts for other, ts in self.texts.items() if other != user) else "unexplained"

    def _text(self, tokens: tuple[int, ...]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)


def ask(url: str, user: str, stream: bool, expected: Expected, errors: dict[int, str]) -> tuple[int, str]:
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "user": user, "return_token_ids": True}
    if not stream:
        r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
        if r.status_code != 200:
            errors.setdefault(r.status_code, r.text[:300])
            return r.status_code, ""
        return 200, expected.verdict(user, tuple(r.json()["choices"][0]["token_ids"]))
    text, failed = "", False
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60, stream=True) as r:
        if r.status_code != 200:
            errors.setdefault(r.status_code, r.text[:300])
            return r.status_code, ""
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    failed = True
                    errors.setdefault(-1, json.dumps(chunk)[:300])
                text += "".join(c.get("text", "") for c in chunk.get("choices", []))
    return (200, "stream error") if failed else (200, expected.text_verdict(user, text))


def replicas() -> list[int]:
    """The replicas' process ids, by the title Ray gives a replica's worker (`ray::ServeReplica:p2p:P2PServer`)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "ServeReplica:p2p:P2PServer" in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-requests", type=int, default=20000, help="stop early past this many requests")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-faults-")
    store, hypernet = build_store(root, args.users, base="tiny-random", noise=0.2, top_k_layers=None)
    users = sorted(store.manifest_rows(store.current()))
    emb = np.random.default_rng(0).standard_normal((args.users, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    expected = Expected(hypernet, users, emb)
    distinct = len({t for ts in expected.by_user.values() for t in ts} | {expected.base})
    print(f"serve_faults: {args.users} users, {distinct - 1} distinct user answers (+ the base model's)")

    from ray import serve

    url = deploy(start_serve(), store.uri, replicas=args.replicas, recheck_s=1.0, cpus_per_replica=1)
    errors: dict[int, str] = {}  # status (0: no response, -1: an error event in a stream) -> its first body

    results: list[tuple[float, float, int, str, bool]] = []  # start, seconds, status, verdict, stream
    rss: list[tuple[float, list[int]]] = []
    events: dict[str, float] = {}
    stop = threading.Event()
    start = time.monotonic()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set() and len(results) < args.max_requests:
            user, stream = rng.choice(users), rng.random() < 0.5
            t0 = time.monotonic()
            try:
                status, verdict = ask(url, user, stream, expected, errors)
            except requests.RequestException as exc:
                status, verdict = 0, type(exc).__name__
                errors.setdefault(0, repr(exc)[:300])
            results.append((t0 - start, time.monotonic() - t0, status, verdict, stream))

    def faults() -> None:
        def at(share: float) -> bool:
            return not stop.wait(max(0.0, start + share * args.seconds - time.monotonic()))

        if at(0.20):
            victim = replicas()[0]
            os.kill(victim, signal.SIGKILL)
            events["replica killed"] = time.monotonic() - start
            while not stop.is_set() and (len(replicas()) < args.replicas or victim in replicas()):
                time.sleep(0.5)
            events["all replicas running again"] = time.monotonic() - start
        if at(0.35):
            for user in users[:3]:
                requests.delete(f"{url}/v1/users/{user}", timeout=60)
            events["3 users deleted"] = time.monotonic() - start
        if at(0.50):
            changed = users[3:9]
            new = np.random.default_rng(1).standard_normal((len(changed), 384)).astype(np.float32)
            adapters = hypernet.user_adapters(new)
            for user, adapter in zip(changed, adapters, strict=True):
                expected.add(user, adapter)
            committed = store.current()
            run_id = store.begin(committed.hypernet_id)
            personalizer = Personalizer(hypernet, committed.hypernet_id)
            kept = [u for u in users if not store.is_deleted(u)]
            vectors = {u: e for u, e in zip(users, emb, strict=True)} | dict(zip(changed, new, strict=True))
            fresh = dict(zip(changed, adapters, strict=True))
            items = [(u, personalizer.files(fresh.get(u) or hypernet.user_adapters(vectors[u][None])[0]), f"r{u}",
                      vectors[u]) for u in kept]
            part = store.write_manifest_part(committed.hypernet_id, run_id,
                                             store.write_adapters(committed.hypernet_id, run_id, items), 384)
            store.commit(committed.hypernet_id, run_id, [part], len(kept))
            events["refresh committed (6 users changed)"] = time.monotonic() - start
        if at(0.65):
            os.rename(f"{root}/store", f"{root}/store.away")
            events["store gone"] = time.monotonic() - start
            at(0.75)
            os.rename(f"{root}/store.away", f"{root}/store")
            events["store back"] = time.monotonic() - start

    def sample_rss() -> None:
        while not stop.wait(2.0):
            sizes = []
            for pid in replicas():
                with contextlib.suppress(psutil.Error):  # it may have just died
                    sizes.append(psutil.Process(pid).memory_info().rss // 2**20)
            rss.append((time.monotonic() - start, sizes))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=faults), threading.Thread(target=sample_rss)]
    for t in threads:
        t.start()
    stop.wait(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    if os.path.exists(f"{root}/store.away"):
        os.rename(f"{root}/store.away", f"{root}/store")
    serve.shutdown()
    return report(args, results, rss, events, errors, distinct - 1)


def report(args, results, rss, events, errors: dict[int, str], distinct: int) -> int:
    ok = [r for r in results if r[2] == 200]
    latencies = sorted(r[1] for r in ok)
    verdicts = collections.Counter(r[3] for r in ok)
    statuses = collections.Counter(r[2] for r in results)
    rows = [{"outcome": f"HTTP {status}" if status else "no response (connection error)", "requests": n}
            for status, n in sorted(statuses.items())]
    rows += [{"outcome": f"answered: {verdict}", "requests": n} for verdict, n in sorted(verdicts.items())]
    peak = max((max(sizes) for _, sizes in rss if sizes), default=0)
    failures = [f"{r[0]:.1f}s {r[2] or 'conn'}" for r in results if r[2] != 200][:12]
    summary = {
        "seconds": args.seconds, "clients": args.clients, "users": args.users, "replicas": args.replicas,
        "distinct answers among the users (wrong-user check resolution)": distinct,
        "requests sent": len(results), "answered (200)": len(ok), "wrong user": verdicts.get("wrong user", 0),
        "failed requests (time, status)": ", ".join(failures) or "none",
        "p50 latency ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "p99 latency ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
        "replica RSS MiB, first / peak / last": (f"{max(rss[0][1], default=0)} / {peak} / {max(rss[-1][1], default=0)}"
                                                if rss else None),
        **{f"t={v:.1f}s": k for k, v in sorted(events.items(), key=lambda kv: kv[1])},
        **{f"first error body, {'stream' if k == -1 else 'connection' if k == 0 else k}": v for k, v in errors.items()},
    }
    if "replica killed" in events and "all replicas running again" in events:
        summary["recovery s (kill -> all replicas running)"] = round(
            events["all replicas running again"] - events["replica killed"], 1)
    write("serve_faults", rows, summary)
    return 0 if summary["wrong user"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
