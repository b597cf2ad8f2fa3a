"""`python -m serving --model-repository models ...`: run the gRPC inference server."""

from __future__ import annotations

import asyncio
import sys

from serving import config, logs


def main(argv: list[str] | None = None) -> int:
    try:
        settings = config.load(argv)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from serving.workers import supervise

        return supervise(settings, sys.argv[1:] if argv is None else argv)
    from serving.cores import pin_from_environment
    from serving.memory import configure_malloc

    pin_from_environment()  # a --workers worker: its own cores
    configure_malloc()  # before gRPC's and ONNX Runtime's threads exist
    from serving.server import serve

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
