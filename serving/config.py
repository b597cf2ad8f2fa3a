"""Settings: command-line flags, then CNNSERVE_* environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "CNNSERVE_"
PROVIDERS = ("cpu", "cuda")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
MiB = 1024 * 1024


def option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A setting's default with its help (and its allowed values) beside it."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Every setting of the server, once: its type, its default and its help."""

    model_repository: Path = option(
        Path("models"),
        "folder laid out as <name>/<version>/model.onnx",
    )
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(50051, "gRPC port")
    metrics_port: int = option(8002, "Prometheus /metrics HTTP port (0 turns it off)")
    http_port: int = option(
        8000,
        "HTTP/1.1 port of the REST API: the KServe v2 REST protocol, /v1 classify, summary and "
        "models, /openapi.json; same process, data plane, limits, token and TLS as gRPC (0 "
        "turns it off)",
    )
    http_read_timeout_s: float = option(
        30.0,
        "an HTTP request's body must arrive within this many seconds, or the request is "
        "answered 408 and its connection closed (slow senders hold no handler for long)",
    )
    http_header_timeout_s: float = option(
        10.0,
        "a new HTTP connection must finish its TLS handshake and send a complete request head "
        "(request line and headers) within this many seconds of being accepted, and a kept-"
        "alive one each further head within this many seconds of its first byte, or it is "
        "closed: clients that send headers slowly (slowloris) or nothing hold no connection "
        "for long",
    )
    provider: str = option(
        "cpu",
        "ONNX Runtime execution provider; cuda falls back to cpu with a warning. On cuda every "
        "run has --max-batch-size images (padded or split): cuDNN re-plans its convolutions "
        "whenever the batch size changes",
        choices=PROVIDERS,
    )
    intra_op_threads: int = option(
        0,
        "ONNX Runtime threads inside one operator of one run (0: one when several runs go side "
        "by side, which is the default on the CPU; else one per core this process may use, its "
        "container's CPU limit counted)",
    )
    concurrent_runs: int = option(
        0,
        "ONNX Runtime runs of one model at once; the batcher shares what is queued out over the"
        " free runs, splitting a large request, so that every core has work under load (0: one "
        "per core this process may use on the CPU, its affinity and container CPU limit "
        "counted; 1 on cuda)",
    )
    inter_op_threads: int = option(1, "ONNX Runtime threads across operators")
    ort_spinning: bool = option(
        False,
        "let ONNX Runtime's idle threads busy-wait for the next run (lower latency on a machine"
        " of its own; on a shared one they take the cores gRPC needs)",
    )
    run_process: str = option(
        "auto",
        "where batched runs go: `on`, a second process holding the models' sessions, fed "
        "through shared memory, so that the runs need no share of the GIL of the process that "
        "reads and answers calls and one connection's calls keep every core busy; `off`, this "
        "process's threads; `auto`, on with batching on the CPU where this process may use "
        "more than one core",
        choices=("auto", "on", "off"),
    )
    batching: bool = option(
        True,
        "dynamic batching of concurrent requests (--no-batching turns it off)",
    )
    max_batch_size: int = option(64, "largest batch formed from concurrent requests")
    max_queue_delay_ms: float = option(
        0.0,
        "how long a batch may wait to fill (0: run what is queued at once)",
    )
    max_request_batch: int = option(1024, "largest batch a single request may carry")
    max_inflight_mb: int = option(
        0,
        "budget, in MiB, for the request data the server holds at once (queued and running, "
        "both APIs, unary and streaming; what a request costs is counted from its tensor's "
        "shape before it is decoded); a request that would pass it is refused UNAVAILABLE (0: "
        "half of what the container's memory limit leaves after the models, or a fixed default "
        "without a limit)",
    )
    max_queue_images: int = option(
        8192,
        "images that may wait in one model's queue; a request that would pass it is refused "
        "UNAVAILABLE (Triton's max_queue_size)",
    )
    max_stream_inflight: int = option(
        64,
        "messages of one stream (PredictStream, ModelStreamInfer) being answered at once; "
        "beyond it the server stops reading that stream until an answer is sent (HTTP/2 flow "
        "control then holds the client back)",
    )
    max_message_mb: int = option(64, "largest gRPC message, in MiB, received or sent")
    max_image_pixels: int = option(
        16_000_000,
        "largest decoded image (width x height) Classify accepts; also Pillow's decompression-"
        "bomb limit (0: no limit of ours, Pillow's default of about 89 megapixels stays)",
    )
    max_feature_map_mb: float = option(
        16.0,
        "largest GetFeatureMaps or GetFilters answer, in MiB of float32 values; a request for "
        "more is refused RESOURCE_EXHAUSTED (ask for fewer layers)",
    )
    max_explain_images: int = option(
        1024,
        "most images one Explain may run (occlusion: its patch positions and the unchanged "
        "image); a larger one is refused RESOURCE_EXHAUSTED (use a larger stride or patch)",
    )
    max_versions: int = option(2, "how many of the newest versions of each model stay loaded")
    poll_seconds: float = option(5.0, "how often the repository is rescanned (0: only on SIGHUP)")
    grace_seconds: float = option(10.0, "how long in-flight calls may drain on SIGTERM")
    max_connection_age_s: float = option(
        300.0,
        "connections are recycled after this age so load spreads (0: never)",
    )
    max_connection_idle_s: float = option(
        120.0,
        "a connection with no call for this long is closed (GOAWAY; the client reconnects when "
        "it next calls), so that idle clients do not hold file descriptors and memory (0: "
        "never)",
    )
    handshake_timeout_s: float = option(
        10.0,
        "a new connection that has not finished its handshake (the HTTP/2 preface and settings,"
        " and TLS) within this time is closed: connections that connect and say nothing are "
        "dropped (0: gRPC's default of 120 s)",
    )
    max_concurrent_streams: int = option(
        1024,
        "calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS), so that"
        " what one connection makes the server hold (requests, half-sent ones included) is "
        "bounded; a client keeps its further calls waiting on its side. gRPC counts a call "
        "until the server has freed it (against clients that reset calls faster than they "
        "finish), so a client near the limit may see some refused UNAVAILABLE, which our client"
        " retries. Well above what dynamic batching needs from one channel (0: no limit)",
    )
    keepalive_time_s: float = option(
        30.0,
        "ping a connection that has calls open but has been quiet this long, so that clients "
        "which vanished without closing (a node gone, a network partition) are found and their "
        "calls freed (0: gRPC's default of 2 hours)",
    )
    keepalive_timeout_s: float = option(
        10.0,
        "how long a keepalive ping may go unanswered before the connection and its calls are "
        "closed",
    )
    min_ping_interval_s: float = option(
        10.0,
        "how often a client may ping while no data flows (client keepalive); pinging more often"
        " counts as abuse and the connection is closed with GOAWAY too_many_pings after two "
        "strikes. gRPC's default of 5 minutes would punish common client keepalives (ours pings"
        " every 20 s) (0: any rate)",
    )
    max_connections: int = option(
        0,
        "connections the process holds at once, both ports together, shared evenly between the"
        " gRPC and REST ports (with --workers, the whole server's, divided between the "
        "workers); a connection beyond its port's share is closed as soon as it is accepted, so"
        " a flood on one port cannot use up the file descriptors the other port, model files "
        "and metrics need (0, and never more than: the process's open-file limit less 256)",
    )
    http2_bdp_probe: bool = option(
        False,
        "let gRPC grow each connection's and call's HTTP/2 receive window with the measured "
        "bandwidth-delay product. Off (the default), a call's window stays at 64 KiB: what gRPC"
        " receives of calls the server has not read yet is bounded by 64 KiB a call, so a burst"
        " of large calls is refused before its bytes arrive; on, large messages cross long, "
        "fast links sooner, but a burst of them is received whole before the server can refuse "
        "any",
    )
    workers: int = option(
        1,
        "server processes sharing the gRPC port (SO_REUSEPORT; the kernel spreads connections, "
        "not calls, over them), each with its own sessions; /metrics sums them",
    )
    reuse_port: bool = option(
        False,
        "let other processes listen on the same gRPC port (SO_REUSEPORT)",
    )
    warmup: bool = option(True, "run every batch size once at load (--no-warmup turns it off)")
    log_level: str = option("info", "debug, info, warning or error", choices=LOG_LEVELS)
    log_format: str = option("text", "text or json", choices=LOG_FORMATS)
    tls_cert: Path | None = option(
        None,
        "PEM certificate (chain) of the server: serve gRPC over TLS (with --tls-key)",
    )
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(
        None,
        "PEM CA certificates: require clients to present a certificate they signed (mTLS)",
    )
    auth_token_file: Path | None = option(
        None,
        "file holding a bearer token every call must carry as `authorization: Bearer <token>` "
        "(health and reflection stay open); or put the token itself in CNNSERVE_AUTH_TOKEN",
    )
    # The token itself, from CNNSERVE_AUTH_TOKEN only (a flag would show it in `ps`).
    auth_token: str = field(
        default="",
        repr=False,
        metadata={"env_only": True, "help": "bearer token (environment only)"},
    )

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB

    @property
    def max_feature_map_bytes(self) -> int:
        return round(self.max_feature_map_mb * MiB)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _converter(kind: Any) -> Any:
    return {
        "Path": Path,
        "Path | None": _optional_path,
        "int": int,
        "float": float,
        "str": str,
        "bool": _parse_bool,
    }[kind]


def program_name(module: str) -> str:
    """How the user called us, for usage lines: the console command (`cnnserve`), or
    `python -m <module>` when run as a module."""
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if (
        not called
        or called == "__main__.py"
        or called.endswith(".py")
        or called.startswith("python")
    ):
        return f"python -m {module}"
    return called


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or program_name("serving"),
        description="Serve the ONNX models of a model repository over gRPC. Every flag can also "
        "be set as an environment variable: --max-batch-size is CNNSERVE_MAX_BATCH_SIZE.",
    )
    defaults = Settings()
    for f in fields(Settings):
        if f.metadata.get("env_only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default {default}; env {ENV_PREFIX}{f.name.upper()})"
        choices = f.metadata.get("choices")
        if f.type == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(
                flag,
                dest=f.name,
                type=_converter(f.type),
                choices=choices,
                help=help_text,
                metavar=None if choices else f.name.upper(),
            )
    return p


# The defaults, for the options of the parts (runtime, batcher, data plane) built from Settings:
# each default is written once, above.
DEFAULTS = Settings()


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message names the flag or variable."""


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        var = ENV_PREFIX + f.name.upper()
        if var in env:
            try:
                values[f.name] = _converter(f.type)(env[var])
            except ValueError as exc:
                raise ConfigError(f"{var}={env[var]!r}: {exc}") from None
            choices = f.metadata.get("choices")
            if choices and values[f.name] not in choices:
                raise ConfigError(f"{var}={env[var]!r}: allowed {', '.join(choices)}")
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(
            f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}={getattr(s, name)!r}: {why}"
        )

    for name in ("port", "metrics_port", "http_port"):
        if not 0 <= getattr(s, name) <= 65535:
            raise bad(name, "expected a port number 0..65535")
    for name in (
        "max_batch_size",
        "max_request_batch",
        "max_message_mb",
        "max_versions",
        "workers",
        "max_queue_images",
        "max_stream_inflight",
        "max_explain_images",
    ):
        if getattr(s, name) < 1:
            raise bad(name, "expected a whole number >= 1")
    for name in (
        "intra_op_threads",
        "concurrent_runs",
        "inter_op_threads",
        "max_image_pixels",
        "max_inflight_mb",
        "max_concurrent_streams",
        "max_connections",
    ):
        if getattr(s, name) < 0:
            raise bad(name, "expected a whole number >= 0")
    for name in (
        "max_queue_delay_ms",
        "poll_seconds",
        "grace_seconds",
        "max_connection_age_s",
        "max_connection_idle_s",
        "handshake_timeout_s",
        "keepalive_time_s",
        "min_ping_interval_s",
    ):
        if getattr(s, name) < 0:
            raise bad(name, "expected a number >= 0")
    for name in (
        "max_feature_map_mb",
        "keepalive_timeout_s",
        "http_read_timeout_s",
        "http_header_timeout_s",
    ):
        if getattr(s, name) <= 0:
            raise bad(name, "expected a number > 0")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
        path = getattr(s, name)
        if path is not None and not path.is_file():
            raise bad(name, "no such file")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise bad(
            "tls_cert" if s.tls_cert is None else "tls_key",
            "TLS needs both --tls-cert and --tls-key",
        )
    if s.tls_client_ca is not None and s.tls_cert is None:
        raise bad("tls_client_ca", "client certificates need TLS: set --tls-cert and --tls-key too")
    if s.auth_token_file is not None and s.auth_token:
        raise ConfigError(
            f"--auth-token-file / {ENV_PREFIX}AUTH_TOKEN_FILE and {ENV_PREFIX}AUTH_TOKEN are both "
            "set: give the token one way"
        )
    read_auth_token(s)


def read_auth_token(s: Settings) -> str | None:
    """The bearer token callers must send, or None when token auth is off. The file holds the
    token alone (surrounding whitespace, a trailing newline included, is ignored)."""
    if s.auth_token_file is None:
        token = s.auth_token.strip()
        where = f"{ENV_PREFIX}AUTH_TOKEN"
    else:
        try:
            token = s.auth_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--auth-token-file {s.auth_token_file}: cannot read it ({exc})"
            ) from None
        where = f"--auth-token-file {s.auth_token_file}"
    if s.auth_token_file is None and not s.auth_token:
        return None
    if not token:
        raise ConfigError(f"{where}: the token is empty")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{where}: the token must be printable ASCII without spaces")
    return token
