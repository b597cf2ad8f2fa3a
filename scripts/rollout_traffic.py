"""Send real test digits to a server, one Predict call each, and say which versions answered
and how often they were right: the traffic of the README's retrain -> shadow -> canary ->
promote cycle (`cnnserve-client rollout status` then shows what the rollout measured).

    python scripts/rollout_traffic.py --target 127.0.0.1:50051 --model mnist --images 2000
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from serving.client import Client
from training import datasets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--model", default="mnist")
    p.add_argument("--dataset", default="mnist", help="whose test images to send")
    p.add_argument("--images", type=int, default=2000, help="calls, one test image each")
    p.add_argument("--offset", type=int, default=0, help="the first test image")
    p.add_argument("--client-keys", type=int, default=0, help="spread calls over N client keys")
    args = p.parse_args(argv)
    ds = datasets.load(args.dataset, allow_download=False)
    x = ds.x_test[args.offset : args.offset + args.images]
    y = ds.y_test[args.offset : args.offset + args.images]
    by_version: Counter[int] = Counter()
    right: Counter[int] = Counter()
    with Client(args.target) as client:
        for i in range(len(x)):
            key = f"client-{i % args.client_keys}" if args.client_keys else ""
            got = client.predict(args.model, x[i : i + 1], client_key=key)
            by_version[got.version] += 1
            right[got.version] += int(got.indices[0][0] == y[i])
    total = sum(by_version.values())
    parts = [
        f"v{v} {n:,} ({n / total:.1%}, {right[v] / n:.2%} right)"
        for v, n in sorted(by_version.items())
    ]
    print(f"{total:,} calls to {args.model}: answered by " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
