"""Updates in seconds: `POST /v1/users/{id}/events` through a live `p2p serve`, timed per event.

    python -m bench.events --store file://$PWD/demo-output/store [--items 100] [--events 20]

A user is built once from a history of `--items` items, then sends `--events` events of one new
item each; each event's wall time (HTTP in, profile + embedding + hypernet + store write, answer
out) is measured from the client, and the next completion is checked to carry the new adapter.
Reports p50/p95 seconds per event. One replica, one CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import requests

from bench.report import write
from bench.serve import deploy, start_serve

PROMPT = "Which tag fits this movie: a haunted house at night?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--events", type=int, default=20)
    args = ap.parse_args(argv)

    from ray import serve

    port = start_serve()
    try:
        url = deploy(port, args.store, service_key="", admin_key="")
        user = f"bench-events-{int(time.time())}"
        genres = ["horror", "comedy", "drama", "action"]
        history = [{"item_id": f"h{i}", "text": f"A {genres[i % 4]} film, number {i}.", "label": genres[i % 4],
                    "ts": 1_700_000_000 + i} for i in range(args.items)]
        r = requests.post(f"{url}/v1/users/{user}/adapter", json={"history": history}, timeout=600)
        r.raise_for_status()
        seconds, changed = [], 0
        for i in range(args.events):
            before = requests.get(f"{url}/v1/users/{user}", timeout=60).json()["adapter"]["sha256"]
            item = {"item_id": f"e{i}", "text": f"A new {genres[i % 4]} film seen today ({i}).",
                    "label": genres[(i + 1) % 4], "ts": 1_800_000_000 + i}
            t0 = time.perf_counter()
            r = requests.post(f"{url}/v1/users/{user}/events", json={"items": [item]}, timeout=600)
            seconds.append(time.perf_counter() - t0)
            r.raise_for_status()
            answer = requests.post(f"{url}/v1/completions", timeout=600,
                                   json={"prompt": PROMPT, "max_tokens": 2, "user": user, "temperature": 0}).json()
            changed += answer["adapter"]["created_at"] >= r.json()["adapter"]["created_at"] and \
                r.json()["adapter"]["sha256"] != before
    finally:
        serve.shutdown()
    p95 = statistics.quantiles(seconds, n=20)[18] if len(seconds) > 1 else seconds[0]
    rows = [{"history items": args.items, "events": args.events, "p50 s per event": round(statistics.median(seconds), 3),
             "p95 s per event": round(p95, 3), "max s": round(max(seconds), 3),
             "events whose next answer used the new adapter": changed}]
    write("events", rows, {"store": args.store, "replica": "1 CPU"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
