"""`cnnserve-client rollout ...`: write a model's rollout policy (set, promote, rollback), read
its state from a server (status).

The writing commands work on the model repository's files, not through a server: the policy
file is the one source of truth, written atomically, and every server over the repository
(every worker, every replica on a shared volume) picks it up on its next scan or on SIGHUP.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from serving.client.sdk import Client
from serving.core import rollout
from serving.core.repository import MODEL_FILE
from serving.core.rollout import Bounds, Policy, PolicyError
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb

WRITING = ("set", "promote", "rollback")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("rollout", help="a model's rollout policy: set, promote, rollback, status")
    actions = r.add_subparsers(dest="action", required=True)
    s = actions.add_parser("set", help="write models/<model>/rollout.yaml (atomically)")
    s.add_argument("model")
    s.add_argument("--models-dir", type=Path, default=Path("models"))
    s.add_argument("--stable", type=int, required=True, help="the version that answers")
    s.add_argument("--candidate", type=int, help="the version to try (none: stable only)")
    s.add_argument("--mode", choices=rollout.MODES, default=rollout.SHADOW)
    s.add_argument("--canary-percent", type=float, default=0.0, help="canary: share of calls")
    s.add_argument(
        "--after",
        type=int,
        default=Bounds.after,
        help="compared images (and candidate calls) before a bound is judged",
    )
    s.add_argument("--min-agreement", type=float, help="roll back under this top-1 agreement")
    s.add_argument("--max-error-rate", type=float, help="roll back over this error rate")
    s.add_argument("--max-p99-ratio", type=float, help="roll back over this p99 / stable's")
    for name, what in (
        ("promote", "the candidate becomes stable (and the policy has no candidate)"),
        ("rollback", "stop trying the candidate: stable only"),
    ):
        w = actions.add_parser(name, help=what)
        w.add_argument("model")
        w.add_argument("--models-dir", type=Path, default=Path("models"))
    st = actions.add_parser("status", help="the rollout as a server reports it (gRPC)")
    st.add_argument("model")
    st.add_argument(
        "--out", type=Path, help="a PNG of the latest disagreements, image and both answers"
    )


def write(args: argparse.Namespace) -> int:
    """set, promote, rollback: the new policy, checked against the versions on disk."""
    folder = args.models_dir / args.model
    if not folder.is_dir():
        print(f"error: {folder}: no such model folder", file=sys.stderr)
        return 2
    on_disk = rollout.versions_on_disk(folder, MODEL_FILE)
    try:
        if args.action == "set":
            policy = rollout.parse(rollout.render(_from_flags(args)), on_disk)
        else:
            current = rollout.read(folder, on_disk)
            if current is None or current.candidate is None:
                what = "no policy" if current is None else f"no candidate ({current.describe()})"
                print(f"error: {folder / rollout.POLICY_FILE}: {what}", file=sys.stderr)
                return 1
            stable = current.candidate if args.action == "promote" else current.stable
            policy = Policy(stable)
    except PolicyError as exc:
        print(f"error: {folder / rollout.POLICY_FILE}: {exc}", file=sys.stderr)
        return 1
    path = rollout.write(folder, policy)
    print(f"wrote {path}: {policy.describe()}")
    return 0


def _from_flags(args: argparse.Namespace) -> Policy:
    bounds = Bounds(args.after, args.min_agreement, args.max_error_rate, args.max_p99_ratio)
    policy = Policy(args.stable, args.candidate, args.mode, args.canary_percent, bounds)
    return policy if args.candidate is not None else dataclasses.replace(policy, bounds=Bounds())


def format_status(r: pb.GetRolloutResponse) -> str:
    p = r.policy
    lines = [f"{r.model}: {p.state}"]
    if p.stable:
        how = f", {p.mode}" + (f" {p.canary_percent:g}%" if p.mode == rollout.CANARY else "")
        lines[0] += f" (stable v{p.stable}" + (
            f", candidate v{p.candidate}{how})" if p.candidate else ")"
        )
    if p.reason:
        lines.append(f"  rolled back: {p.reason}")
    if p.file_error:
        lines.append(f"  policy file refused: {p.file_error} (the last good policy stays)")
    if r.compared:
        lines.append(
            f"  compared {r.compared:,} images: top-1 agreement {r.agreement:.1%} "
            f"({r.agreed:,}), mean |diff| of the probabilities {r.mean_abs_diff:.4f}; "
            f"copies shed under load {r.shed:,}"
        )
    for v in r.versions:
        lines.append(
            f"  v{v.version} {v.role:<11} {v.calls:>7,} calls  errors {v.error_rate:6.2%}  "
            f"p50 {v.p50_ms:7.2f} ms  p99 {v.p99_ms:7.2f} ms"
        )
    if r.disagreements:
        lines.append(f"  latest disagreements ({len(r.disagreements)}):")
        for d in r.disagreements:
            at = time.strftime("%H:%M:%S", time.localtime(d.time))
            lines.append(
                f"    {at}  v{p.stable} {d.stable.label} ({d.stable.score:.3f})  "
                f"v{p.candidate} {d.candidate.label} ({d.candidate.score:.3f})"
            )
    return "\n".join(lines)


def status(client: Client, args: argparse.Namespace) -> int:
    got = client.rollout(args.model)
    print(format_status(got))
    if args.out is not None:
        from serving.client import pictures

        p = got.policy
        items = [
            (
                np.frombuffer(d.image.data, np.uint8).reshape(tuple(d.image.shape)),
                f"v{p.stable}: {d.stable.label}",
                f"v{p.candidate}: {d.candidate.label}",
            )
            for d in got.disagreements
        ]
        title = f"{got.model}: v{p.stable} (black) and v{p.candidate} (red) disagree"
        pictures.disagreements_picture(items, title).save(args.out, format="PNG")
        print(f"wrote {args.out}")
    return 0
