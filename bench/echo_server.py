"""The do-nothing gRPC floor: a grpc.aio server that answers every call with canned bytes.

No model, no metrics, no protobuf parsing: the request bytes arrive (identity deserializer), a
fixed, pre-serialized response leaves (identity serializer). Given the real server's response
bytes for the same request, it moves the same payload both ways as the real server does, so
the difference between the two is what cnnserve adds on top of grpc.aio itself.

- unary methods: `--unary METHOD=FILE` answers METHOD with FILE's bytes; `--response FILE`
  answers every other unary method (what h2load needs: it posts to one path);
- bidirectional streams: `--stream METHOD=FILE` answers each message of a METHOD stream with
  FILE's bytes, in order, one answer per message. For the two inference streams the request's
  id is copied into its answer, as the real server does and as Triton's clients (perf_analyzer)
  need to match answers to requests: `ModelStreamInfer` (ModelInferRequest.id, field 3, into
  ModelStreamInferResponse.infer_response.id) and `PredictStream` (PredictRequest.id, field 6,
  into PredictStreamResponse.id; the message's index on the stream when the request has none).
  The id is found by walking the request's top-level wire fields, no message is parsed;
- HTTP/1.1 (`--http-port`, aiohttp on the same event loop, as the real server's REST API):
  `--http PATH=FILE@N` answers a POST to PATH, once its whole body is read, with FILE's bytes as
  Triton's binary tensor extension (`application/octet-stream`, `Inference-Header-Content-Length:
  N`), `--http PATH=FILE` as `application/json`: the floor of aiohttp under the REST rows;
- `--parse`: the honest floor of a server that must read what it is sent. The two inference
  methods (`/cnnserve.v1.CnnServe/Predict`, `/inference.GRPCInferenceService/ModelInfer`) parse
  each request into its protobuf message, check that it carries one tensor, and build their
  answer as a message (the canned response parsed once, copied, the request's id and model set
  on it) serialized anew per call, as a real server must. Still no model and no metrics;
- `/cnnserve.bench.Echo/Answered` answers with what it has done, as JSON: `{"answered": {method:
  messages answered}, "streams": streams open now}` (HTTP routes counted as "POST PATH"), so that
  a benchmark can divide its load generator's CPU by what was really served and see how many
  streams the load generator opened.

    python bench/echo_server.py --port 0 --response FILE   # prints "port N" once listening
    python bench/echo_server.py --port 0 --unary /inference.GRPCInferenceService/ModelConfig=F1 \
        --stream /inference.GRPCInferenceService/ModelStreamInfer=F2
    python bench/echo_server.py --port 0 --http-port 8123 --http /v2/models/m/infer=F3@120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

MiB = 1024 * 1024
ANSWERED = "/cnnserve.bench.Echo/Answered"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
PREDICT_STREAM = "/cnnserve.v1.CnnServe/PredictStream"
# stream method -> (the request's id field, the path of field numbers to the answer's id,
# whether a request without an id gets its index on the stream)
STREAM_IDS: dict[str, tuple[int, tuple[int, ...], bool]] = {
    MODEL_STREAM_INFER: (3, (2, 3), False),
    PREDICT_STREAM: (6, (3,), True),
}
LENGTH_DELIMITED = 2
HEADER_LENGTH = "Inference-Header-Content-Length"


# ================================================================================== wire format


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, start of the field's tag, end of the field) of each field."""
    out = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == LENGTH_DELIMITED:
            size, pos = _varint(data, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} (groups) is not supported")
        out.append((number, wire, start, pos))
    return out


def find_bytes(data: bytes, number: int) -> bytes | None:
    """The value of the first length-delimited top-level field `number`, or None. Walks the
    fields in order and stops at the first match: the id fields come before the tensors."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            wire = key & 7
            if wire == LENGTH_DELIMITED:
                size, pos = _varint(data, pos)
                if key >> 3 == number:
                    return data[pos : pos + size]
                pos += size
            elif wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return None
    except IndexError:  # truncated: no id
        return None
    return None


def length_delimited(number: int, value: bytes) -> bytes:
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(value)) + value


def with_id(message: bytes, path: tuple[int, ...]) -> Callable[[bytes], bytes]:
    """A function id -> `message` with the string at `path` (field numbers, outermost first)
    set to id (an empty id: the field left out). The message is taken apart once, here."""
    number = path[0]
    parts = _fields(message)
    rest = b"".join(message[s:e] for n, _, s, e in parts if n != number)
    if len(path) == 1:
        return lambda ident: (rest + length_delimited(number, ident)) if ident else rest
    build_inner = with_id(find_bytes(message, number) or b"", path[1:])
    return lambda ident: rest + length_delimited(number, build_inner(ident))


# ================================================================================== handlers


PREDICT = "/cnnserve.v1.CnnServe/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


Parsing = tuple[Callable[[Any], Any], Any, Any]  # (request -> response, their two types)


def parsing_answer(method: str, response: bytes) -> Parsing | None:
    """For `--parse`: (request message -> response message) of an inference method, and its
    request and response types; None for other methods. The imports are protobuf's generated
    code only, as light as grpc.aio's own."""
    if method == PREDICT:
        from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb

        canned = pb.PredictResponse.FromString(response)

        def predict(request: Any) -> Any:
            if not request.images.data:
                raise ValueError("no images")
            out = pb.PredictResponse()
            out.CopyFrom(canned)
            out.model = request.model
            return out

        return predict, pb.PredictRequest, pb.PredictResponse
    if method == MODEL_INFER:
        from serving.pb.inference import grpc_predict_v2_pb2 as v2

        canned_v2 = v2.ModelInferResponse.FromString(response)

        def infer(request: Any) -> Any:
            if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
                raise ValueError("expected one input")
            out = v2.ModelInferResponse()
            out.CopyFrom(canned_v2)
            out.model_name, out.id = request.model_name, request.id
            return out

        return infer, v2.ModelInferRequest, v2.ModelInferResponse
    return None


class _Canned(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(
        self,
        default: bytes | None,
        unary: dict[str, bytes],
        streams: dict[str, bytes],
        parse: bool = False,
    ) -> None:
        self.answered: dict[str, int] = {}
        self.streams = 0
        self._handlers: dict[str, Any] = {}
        self._parse = parse

        async def answered(request: bytes, context: Any) -> bytes:
            return json.dumps({"answered": self.answered, "streams": self.streams}).encode()

        self._default = default
        for method, response in unary.items():
            self._handlers[method] = self._canned(method, response)
        self._handlers[ANSWERED] = grpc.unary_unary_rpc_method_handler(answered)
        for method, response in streams.items():
            self._handlers[method] = self._stream(method, response)

    def _canned(self, method: str, response: bytes) -> Any:
        self.answered[method] = 0
        parsing = parsing_answer(method, response) if self._parse else None
        if parsing is not None:
            build, request_type, response_type = parsing

            async def parsed(request: Any, context: Any) -> Any:
                self.answered[method] += 1
                try:
                    return build(request)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

            return grpc.unary_unary_rpc_method_handler(
                parsed, request_type.FromString, response_type.SerializeToString
            )

        async def answer(request: bytes, context: Any) -> bytes:
            self.answered[method] += 1
            return response

        # No (de)serializers: the handler sees and returns raw bytes.
        return grpc.unary_unary_rpc_method_handler(answer)

    def _stream(self, method: str, response: bytes) -> Any:
        ids = STREAM_IDS.get(method)
        if ids is None:

            async def plain(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
                self.streams += 1
                try:
                    async for _ in requests:
                        self.answered[method] += 1
                        yield response
                finally:
                    self.streams -= 1

            self.answered[method] = 0
            return grpc.stream_stream_rpc_method_handler(plain)
        request_field, path, index_default = ids
        build = with_id(response, path)

        async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            index = 0
            self.streams += 1
            try:
                async for request in requests:
                    ident = find_bytes(request, request_field)
                    if not ident and index_default:
                        ident = str(index).encode()
                    index += 1
                    self.answered[method] += 1
                    yield build(ident or b"")
            finally:
                self.streams -= 1

        self.answered[method] = 0
        return grpc.stream_stream_rpc_method_handler(echo)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None and self._default is not None and len(self._handlers) < 1000:
            handler = self._handlers[method] = self._canned(method, self._default)
        if handler is None:
            print(f"no canned answer for {method}: UNIMPLEMENTED", flush=True)
        return handler


@dataclass(frozen=True)
class HttpAnswer:
    body: bytes
    header_length: int | None  # binary tensor extension: where the JSON ends; None: JSON only


def http_app(answers: dict[str, HttpAnswer], counts: dict[str, int], max_message_mb: int) -> Any:
    """POST PATH: the body read whole (as the real server does), the canned answer sent."""

    def route(path: str, answer: HttpAnswer) -> Callable[[web.Request], Awaitable[web.Response]]:
        key = f"POST {path}"
        counts[key] = 0
        if answer.header_length is None:
            headers = {"Content-Type": "application/json"}
        else:
            headers = {
                "Content-Type": "application/octet-stream",
                HEADER_LENGTH: str(answer.header_length),
            }

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            counts[key] += 1
            return web.Response(body=answer.body, headers=headers)

        return handle

    app = web.Application(client_max_size=max_message_mb * MiB)
    for path, answer in answers.items():
        app.router.add_post(path, route(path, answer))
    return app


async def serve(
    port: int,
    default: bytes | None,
    unary: dict[str, bytes],
    streams: dict[str, bytes],
    max_message_mb: int,
    *,
    http_port: int = 0,
    http: dict[str, HttpAnswer] | None = None,
    parse: bool = False,
) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_mb * MiB),
            ("grpc.max_send_message_length", max_message_mb * MiB),
            ("grpc.so_reuseport", 0),
        ]
    )
    canned = _Canned(default, unary, streams, parse)
    server.add_generic_rpc_handlers((canned,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    runner = None
    if http_port:
        app = http_app(http or {}, canned.answered, max_message_mb)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", http_port).start()
        print(f"http {http_port}", flush=True)
    print(f"port {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if runner is not None:
        await runner.cleanup()
    await server.stop(0.5)


def _method_files(values: list[str], flag: str) -> dict[str, bytes]:
    out = {}
    for value in values:
        method, sep, file = value.partition("=")
        if not sep or not method.startswith("/"):
            raise SystemExit(f"{flag} {value!r}: expected /package.Service/Method=FILE")
        out[method] = Path(file).read_bytes()
    return out


def _http_answers(values: list[str]) -> dict[str, HttpAnswer]:
    out = {}
    for value in values:
        path, sep, spec = value.partition("=")
        file, at, length = spec.rpartition("@") if "@" in spec else (spec, "", "")
        if not sep or not path.startswith("/") or (at and not length.isdigit()):
            raise SystemExit(f"--http {value!r}: expected /path=FILE or /path=FILE@N")
        out[path] = HttpAnswer(Path(file).read_bytes(), int(length) if at else None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument(
        "--response", type=Path, help="serialized response to any unary method not in --unary"
    )
    p.add_argument(
        "--unary",
        action="append",
        default=[],
        metavar="METHOD=FILE",
        help="serialized response to this unary method",
    )
    p.add_argument(
        "--stream",
        action="append",
        default=[],
        metavar="METHOD=FILE",
        help="serialized response to each message of this bidirectional stream",
    )
    p.add_argument("--http-port", type=int, default=0, help="HTTP/1.1 port (0: none)")
    p.add_argument(
        "--http",
        action="append",
        default=[],
        metavar="PATH=FILE[@N]",
        help="answer POST PATH with FILE's bytes: binary tensor extension with a JSON header of "
        "N bytes, or JSON without @N",
    )
    p.add_argument(
        "--parse",
        action="store_true",
        help="the inference methods parse each request and build their answer as a message",
    )
    p.add_argument("--max-message-mb", type=int, default=64)
    args = p.parse_args(argv)
    default = args.response.read_bytes() if args.response else None
    if default is None and not args.unary and not args.stream:
        default = b""
    unary = _method_files(args.unary, "--unary")
    streams = _method_files(args.stream, "--stream")
    http = _http_answers(args.http)
    asyncio.run(
        serve(
            args.port,
            default,
            unary,
            streams,
            args.max_message_mb,
            http_port=args.http_port,
            http=http,
            parse=args.parse,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
