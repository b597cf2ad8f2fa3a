"""What the batcher itself costs a request, with a run that costs nothing: CPU µs per request.

    .venv/bin/python -m bench.batcher_overhead

Three shapes of traffic, one batcher each (inline runs, as batch-1 runs go on the CPU):
- `idle loop`: one request at a time, nothing else ready (a lone call on a quiet server);
- `busy loop, unary`: one request a loop turn with another callback ready beside it, as grpc.aio
  hands over unary calls under load; once `Joins` has seen that none are joined, they run at once;
- `busy loop, bursts of 4`: four requests in the same turn, as a stream's messages arrive; they
  are held back a turn and run as one batch.
Figures go to bench/PROFILE.md; this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.core.batching import Batcher


def _noop() -> None:
    pass


async def _measure(kind: str, requests: int) -> tuple[float, float]:
    """CPU µs per request and images per run, after a warm-up of the same traffic."""
    x = np.ones((1, 3), np.float32)
    runs = 0

    def run(batch: np.ndarray) -> np.ndarray:
        nonlocal runs
        runs += 1
        return batch

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=64, inline=True)

        async def traffic(n: int) -> None:
            for _ in range(n):
                if kind == "idle loop":
                    await batcher.submit(x)
                elif kind == "busy loop, unary":
                    loop.call_soon(_noop)
                    await batcher.submit(x)
                else:
                    loop.call_soon(_noop)
                    await asyncio.gather(*(batcher.submit(x) for _ in range(4)))

        per_turn = 4 if kind.endswith("bursts of 4") else 1
        await traffic(2_000 // per_turn)
        runs = 0
        started = time.process_time()
        await traffic(requests // per_turn)
        seconds = time.process_time() - started
        await batcher.close()
    return seconds / requests * 1e6, requests / max(runs, 1)


async def _main(requests: int) -> None:
    for kind in ("idle loop", "busy loop, unary", "busy loop, bursts of 4"):
        us, per_run = await _measure(kind, requests)
        print(f"{kind:24s} {us:6.2f} µs CPU a request, {per_run:4.1f} requests a run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    asyncio.run(_main(parser.parse_args().requests))


if __name__ == "__main__":
    main()
