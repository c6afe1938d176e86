"""Refit the label gate of a trained run (and its controls) without training again.

    python -m bench.refit_gate --run RUN --data DATA [--controls shared]

The gate is fitted after training (p2p/train/gate_fit.py), so a change to the fit, or to its
`label_gate_examples`, is tried on the same trained hypernet in minutes rather than in another
30-minute `p2p train`. Each folder's `best/` is refitted in place, as `p2p train` fits it (the fit
reads the hypernet with its gate shut, so an earlier gate does not enter the new one), and the
folder's `summary.json` gets the new fit's report. Choose between fits on val users
(`bench.val_eval`), never on the users you report.
"""

from __future__ import annotations

import argparse
import json
import os

from p2p.config import config_from_dict
from pipelines.train import fit_run_gate, profiles_folder, training_profiles


def profiles_of(run: str, data: str) -> str:
    """The profiles folder the run trained on, where `p2p train` found or built it: the run's own, else,
    for a control (its folder is inside its P2P run's), the P2P run's."""
    candidates = [profiles_folder(data, run), profiles_folder(data, os.path.dirname(os.path.abspath(run)))]
    folder = next((c for c in candidates if os.path.isdir(c)), None)
    if folder is None:
        raise SystemExit(f"no profiles for {run}: none of {', '.join(candidates)}")
    return folder


def refit(run: str, data: str) -> dict:
    """Refit RUN/best's gate with RUN's own training config; update RUN/summary.json."""
    with open(os.path.join(run, "train_config.json")) as f:
        config = config_from_dict(json.load(f))
    if not config.label_gate:
        raise SystemExit(f"{run}/train_config.json: label_gate is off; there is no gate to refit")
    profiles = training_profiles(config, profiles_of(run, data))
    report = fit_run_gate(config, data, profiles, os.path.join(run, "best"), print)
    summary_path = os.path.join(run, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    summary["label_gate"] = report
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `p2p train` output folder (train_config.json, best/)")
    ap.add_argument("--data", required=True, help="the data it was trained on (DATA/profiles made by `p2p profiles`)")
    ap.add_argument("--controls", default="", help="also refit these controls' folders inside RUN, e.g. shared")
    args = ap.parse_args(argv)
    for folder in [args.run, *(os.path.join(args.run, c) for c in args.controls.split(",") if c)]:
        refit(folder, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
