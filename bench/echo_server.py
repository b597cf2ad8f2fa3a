"""The do-nothing gRPC floor: a grpc.aio server that answers every unary call with canned bytes.

No parsing, no model, no metrics: the request bytes arrive (identity deserializer), a fixed,
pre-serialized response leaves (identity serializer). Given the real server's response bytes
for the same request, it moves the same payload both ways as the real server does, so the
difference between the two is what cnnserve adds on top of grpc.aio itself.

    python bench/echo_server.py --port 0 --response FILE   # prints "port N" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

MiB = 1024 * 1024


class _Canned(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, response: bytes) -> None:
        async def answer(request: bytes, context: Any) -> bytes:
            return response

        # No (de)serializers: the handler sees and returns raw bytes.
        self._handler = grpc.unary_unary_rpc_method_handler(answer)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler


async def serve(port: int, response: bytes, max_message_mb: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_mb * MiB),
            ("grpc.max_send_message_length", max_message_mb * MiB),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((_Canned(response),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"port {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--response", type=Path, help="file of the serialized response to send")
    p.add_argument("--max-message-mb", type=int, default=64)
    args = p.parse_args(argv)
    response = args.response.read_bytes() if args.response else b""
    asyncio.run(serve(args.port, response, args.max_message_mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
