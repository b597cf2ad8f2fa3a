"""Python client for cnnserve (the `cnnserve-client` command line is `serving.client.cli`).

client = Client("localhost:50051")
result = client.predict("mnist", images)         # numpy uint8/float32 [N, H, W, C]
labels = client.classify("mnist", ["digit.png"])  # files or bytes

Over TLS (mutual TLS with a client certificate) and with a bearer token:
client = Client("host:50051", root_certificates="ca.pem", client_cert="me.pem",
                client_key="me.key", token=open("token").read().strip())

Several servers, calls spread over them (round_robin), a refused call retried on another:
client = Client("ipv4:10.0.0.1:50051,10.0.0.2:50051")   # or "dns:///cnnserve-headless:50051"

Retries are gRPC's own (its service config, gRFC A6): a call that ends UNAVAILABLE (a server
refusing work under overload, shutting down, or not reachable) is attempted again after a
jittered exponential backoff, within the call's deadline. Every RPC of cnnserve is idempotent
(inference has no side effects), so a repeated call is always safe. SERVICE_CONFIG is the JSON,
for clients in other languages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import tensors, tokens
from serving.config import MiB
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
# The services our calls go to: the retry policy applies to these (all of their methods).
SERVICES = ("cnnserve.v1.CnnServe", "inference.GRPCInferenceService", "grpc.health.v1.Health")
TOKEN_ENV = "CNNSERVE_AUTH_TOKEN"  # the CLI's token when --token-file is not given
Pem = bytes | str | Path  # PEM bytes, or the path of a PEM file


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy (gRFC A6). Attempt n+1 starts after a backoff drawn within ±20 % of
    min(initial_backoff_s * backoff_multiplier**(n-1), max_backoff_s); with the defaults about
    0.1, 0.2, 0.4 and 0.8 s, so a call gives up about 1.5 s after its first refusal (or at its
    deadline, whichever comes first). gRPC caps max_attempts at 5.

    Retry throttling (per server name, shared by the channels of one process) keeps retries
    from piling onto servers that refuse much of their load: each failed call takes a token,
    each success gives back `throttle_token_ratio`, and retries stop while fewer than half of
    `throttle_max_tokens` are left; with the defaults, once more than about 1 call in 11 fails
    for a while. 0 turns throttling off."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)
    throttle_max_tokens: int = 100
    throttle_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("max_attempts: 2..5 (gRPC caps it at 5)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoffs and their multiplier must be > 0")
        if not self.retryable_codes:
            raise ValueError("retryable_codes: at least one status code")
        for code in self.retryable_codes:
            if code not in grpc.StatusCode.__members__ or code == "OK":
                raise ValueError(f"retryable_codes: {code!r} is not a gRPC error code")
        if not 0 <= self.throttle_max_tokens <= 1000 or self.throttle_token_ratio <= 0:
            raise ValueError("throttling: max tokens 0..1000, token ratio > 0")

    def as_json(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff_s),
            "maxBackoff": _duration(self.max_backoff_s),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_codes),
        }


DEFAULT_RETRY = RetryPolicy()


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"  # protobuf JSON Duration: "0.1s"


def service_config(
    retry: RetryPolicy | None = DEFAULT_RETRY,
    *,
    load_balancing: str = "round_robin",
    health_check: bool = False,
) -> str:
    """The gRPC service config our Client uses, as JSON (`grpc.service_config`):
    - `load_balancing`: round_robin keeps a connection to every address the target resolves
      to (an `ipv4:a:port,b:port` list, or a `dns:///` name such as a headless Kubernetes
      Service) and sends each call to the next ready one; pick_first uses one at a time;
    - `health_check`: each address's `grpc.health.v1` status ("" service: SERVING once a model
      is ready, NOT_SERVING while draining) is watched, and round_robin skips the ones that are
      not SERVING (a server without the health service counts as healthy). For fleets; off by
      default, because a server that is not SERVING then cannot be reached at all (every call
      fails UNAVAILABLE), not even to ask it what is wrong (ListModels, Check);
    - `retry`: the retry policy of every method of SERVICES (None: no retries)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    if retry is not None:
        config["methodConfig"] = [
            {"name": [{"service": s} for s in SERVICES], "retryPolicy": retry.as_json()}
        ]
        if retry.throttle_max_tokens:
            config["retryThrottling"] = {
                "maxTokens": retry.throttle_max_tokens,
                "tokenRatio": retry.throttle_token_ratio,
            }
    return json.dumps(config)


SERVICE_CONFIG = service_config()


def _pem(source: Pem | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerToken(  # type: ignore[misc]
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds `authorization: Bearer <token>` to every call (works on plaintext channels too,
    where gRPC refuses call credentials; send tokens over TLS)."""

    def __init__(self, token: str) -> None:
        self._header = (tokens.HEADER, tokens.header_value(token))

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    probabilities: npt.NDArray[np.float32] | None
    labels: list[list[tuple[str, float]]]  # per image: (label, score), best first
    indices: list[list[int]]


def _classifications(
    items: Sequence[pb.Classification],
) -> tuple[list[list[tuple[str, float]]], list[list[int]]]:
    labels = [[(s.label, s.score) for s in c.top] for c in items]
    indices = [[s.index for s in c.top] for c in items]
    return labels, indices


@dataclass(frozen=True)
class FeatureMaps:
    """One image's activations as the server computed them: layer name -> float32 [H, W, C],
    in the graph's order, and the prediction of the same run."""

    model: str
    version: int
    maps: dict[str, npt.NDArray[np.float32]]
    kinds: dict[str, str]  # layer name -> Conv2D, MaxPooling2D, ...
    image: npt.NDArray[np.uint8]  # [H, W, C]: the image as the model saw it
    probabilities: npt.NDArray[np.float32]  # [classes]
    labels: list[tuple[str, float]]  # the top classes, best first


@dataclass(frozen=True)
class Explanation:
    """Which pixels made the model answer `label`: a heat map of the input's height and width
    (occlusion: the fall of the class's probability; grad_cam: the weighted activations)."""

    model: str
    version: int
    heat: npt.NDArray[np.float32]  # [H, W]
    image: npt.NDArray[np.uint8]  # [H, W, C]: the image as the model saw it
    class_index: int
    label: str
    probability: float  # of the class, for the unchanged image
    method: str
    patch: int  # occlusion's parameters (0 for grad_cam)
    stride: int
    layer: str  # grad_cam's convolution layer
    images: int  # images the server ran


@dataclass(frozen=True)
class Filters:
    model: str
    version: int
    layer: str
    kernels: npt.NDArray[np.float32]  # [K, K, in, out]
    biases: npt.NDArray[np.float32]  # [out]


def _array(t: pb.Tensor) -> npt.NDArray[Any]:
    datatype = "UINT8" if t.dtype == pb.DATA_TYPE_UINT8 else "FP32"
    return tensors.decode(t.data, datatype, t.shape)


def _tensor(array: npt.NDArray[Any]) -> pb.Tensor:
    """A uint8 or float32 array as our API's Tensor (the twin of `_array`)."""
    if array.dtype == np.uint8:
        dtype = pb.DATA_TYPE_UINT8
    elif array.dtype == np.float32:
        dtype = pb.DATA_TYPE_FLOAT32
    else:
        raise TypeError(f"images must be uint8 or float32, not {array.dtype}")
    return pb.Tensor(dtype=dtype, shape=array.shape, data=tensors.to_bytes(array))


@dataclass(frozen=True)
class Failure:
    """A streamed batch the server answered with an error (the other batches go on)."""

    index: int  # the batch's position on the stream, from 0
    code: grpc.StatusCode
    message: str


def predict_request(
    model: str,
    images: npt.NDArray[np.uint8] | npt.NDArray[np.float32],
    version: int = 0,
    top_k: int = 1,
    omit_probabilities: bool = False,
    *,
    client_key: str = "",
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model,
        version=version,
        images=_tensor(np.ascontiguousarray(images)),
        top_k=top_k,
        omit_probabilities=omit_probabilities,
        client_key=client_key,
    )


def _prediction(response: pb.PredictResponse) -> Prediction:
    probabilities = None
    if response.HasField("probabilities"):
        probabilities = _array(response.probabilities)
    labels, indices = _classifications(response.classifications)
    return Prediction(response.model, response.version, probabilities, labels, indices)


# A stream's error answer carries its status code as a number (google.rpc.Code); the
# hostile-traffic checks (harness.fuzz, harness.soak) read it through this table too.
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(value: int) -> grpc.StatusCode:
    return STATUS_BY_NUMBER.get(value, grpc.StatusCode.UNKNOWN)


class Client:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        max_message_mb: int = 64,
        channel: grpc.Channel | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        load_balancing: str = "round_robin",
        health_check: bool = False,
        keepalive_s: float | None = 20.0,
        max_reconnect_backoff_s: float = 2.0,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        """`target`: host:port, `ipv4:a:port,b:port` (several servers), `dns:///name:port`
        (every address of the name: a headless Kubernetes Service) or any gRPC target.

        TLS when `tls` is set or any certificate is given: `root_certificates` (the CA that
        signed the server's certificate; the system's roots when None), `client_cert` and
        `client_key` for mutual TLS. `token`: sent as `authorization: Bearer <token>`.

        Reliability (see `service_config`): `retry` (None: a call is attempted once; all our
        RPCs are idempotent, so retrying is safe), `load_balancing`, and `health_check` (True:
        skip the addresses that are not SERVING, e.g. draining replicas); `keepalive_s`: ping a connection with calls open that has gone quiet this
        long, so a server that vanished is noticed in seconds, not at each call's deadline
        (None: off; our server accepts pings every 10 s); `max_reconnect_backoff_s`: the
        longest wait between attempts to reach an address that is down (gRPC's own is 120 s,
        too slow to take back a restarted replica). `options`: more gRPC channel arguments,
        last word. None of this applies to a `channel` passed in."""
        if (client_cert is None) != (client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        channel_options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_mb * MiB),
            ("grpc.max_send_message_length", max_message_mb * MiB),
            (
                "grpc.service_config",
                service_config(retry, load_balancing=load_balancing, health_check=health_check),
            ),
            ("grpc.enable_retries", 0 if retry is None else 1),
            # A call is only retried while its request fits in this buffer (gRPC's default is
            # 256 KiB: a 400-image 28x28 batch would be attempted once).
            ("grpc.per_rpc_retry_buffer_size", max_message_mb * MiB),
            ("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff_s * 1000)),
            *(
                [
                    ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
                    ("grpc.keepalive_timeout_ms", 10_000),
                ]
                if keepalive_s
                else []
            ),
            *options,
        ]
        if channel is None:
            if tls or root_certificates is not None or client_cert is not None:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_pem(root_certificates),
                    private_key=_pem(client_key),
                    certificate_chain=_pem(client_cert),
                )
                channel = grpc.secure_channel(target, credentials, options=channel_options)
            else:
                channel = grpc.insecure_channel(target, options=channel_options)
        self._raw_channel = channel
        self._channel = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
        self.stub = pb_grpc.CnnServeStub(self._channel)
        self.health_stub = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(
        self,
        model: str,
        images: npt.NDArray[np.uint8] | npt.NDArray[np.float32],
        *,
        version: int = 0,
        top_k: int = 1,
        omit_probabilities: bool = False,
        client_key: str = "",
    ) -> Prediction:
        """`client_key`: the caller's key; under a canary rollout its calls stay on one side."""
        request = predict_request(
            model, images, version, top_k, omit_probabilities, client_key=client_key
        )
        return _prediction(self.stub.Predict(request, timeout=self.timeout))

    def predict_stream(
        self,
        model: str,
        batches: Iterable[npt.NDArray[np.uint8] | npt.NDArray[np.float32]],
        *,
        version: int = 0,
        top_k: int = 1,
        omit_probabilities: bool = False,
        timeout: float | None = None,
    ) -> Generator[Prediction | Failure, None, None]:
        """Every batch over one PredictStream call; yields one answer per batch, in order: a
        `Prediction`, or a `Failure` for a batch the server refused (the stream goes on).
        Batches are sent as the server takes them (HTTP/2 flow control), so `batches` may be a
        generator of any length. `timeout`: for the whole stream (default none). Closing the
        iterator early cancels the stream."""
        requests = (
            predict_request(model, images, version, top_k, omit_probabilities) for images in batches
        )
        call = self.stub.PredictStream(requests, timeout=timeout)
        try:
            for index, answer in enumerate(call):
                if answer.WhichOneof("result") == "error":
                    yield Failure(index, _status_code(answer.error.code), answer.error.message)
                else:
                    yield _prediction(answer.response)
        finally:
            call.cancel()  # a no-op once the stream has ended

    def classify(
        self,
        model: str,
        images: Sequence[str | Path | bytes],
        *,
        version: int = 0,
        top_k: int = 1,
        client_key: str = "",
    ) -> Prediction:
        items = [
            pb.Image(encoded=img if isinstance(img, bytes) else Path(img).read_bytes())
            for img in images
        ]
        request = pb.ClassifyRequest(
            model=model, version=version, images=items, top_k=top_k, client_key=client_key
        )
        response = self.stub.Classify(request, timeout=self.timeout)
        labels, indices = _classifications(response.classifications)
        return Prediction(response.model, response.version, None, labels, indices)

    def feature_maps(
        self,
        model: str,
        image: str | Path | bytes | npt.NDArray[np.uint8],
        *,
        layers: Sequence[str] = (),
        version: int = 0,
        top_k: int = 3,
    ) -> FeatureMaps:
        """The activations of each convolution and pooling layer (or of `layers`) for one
        image: a file, encoded bytes, or uint8 pixels [H, W] / [H, W, C]."""
        if isinstance(image, np.ndarray):
            item = pb.Image(pixels=_tensor(np.ascontiguousarray(image, dtype=np.uint8)))
        else:
            item = pb.Image(encoded=image if isinstance(image, bytes) else Path(image).read_bytes())
        response = self.stub.GetFeatureMaps(
            pb.GetFeatureMapsRequest(
                model=model, version=version, image=item, layers=layers, top_k=top_k
            ),
            timeout=self.timeout,
        )
        return FeatureMaps(
            response.model,
            response.version,
            {m.name: _array(m.values) for m in response.layers},
            {m.name: m.kind for m in response.layers},
            _array(response.image),
            _array(response.probabilities),
            [(s.label, s.score) for s in response.classification.top],
        )

    def explain(
        self,
        model: str,
        image: str | Path | bytes | npt.NDArray[Any],
        *,
        method: str = "occlusion",
        class_index: int | None = None,
        patch: int = 0,
        stride: int = 0,
        version: int = 0,
    ) -> Explanation:
        """A heat map of what made the model answer `class_index` (None: its best class) for
        one image: a file, encoded bytes, uint8 pixels of any size ([H, W] / [H, W, C],
        resized as `classify` does), or float32 model input [1, H, W, C] / [H, W, C].
        `method`: occlusion (patch and stride in pixels, 0: the server's defaults) or grad_cam."""
        request = pb.ExplainRequest(
            model=model,
            version=version,
            method=method,
            patch=patch,
            stride=stride,
            class_index=class_index,
        )
        if isinstance(image, np.ndarray) and image.dtype == np.float32:
            request.tensor.CopyFrom(_tensor(np.ascontiguousarray(image)))
        elif isinstance(image, np.ndarray):
            request.image.pixels.CopyFrom(_tensor(np.ascontiguousarray(image, dtype=np.uint8)))
        else:
            request.image.encoded = image if isinstance(image, bytes) else Path(image).read_bytes()
        r = self.stub.Explain(request, timeout=self.timeout)
        return Explanation(
            r.model, r.version, _array(r.heat), _array(r.image), r.class_index, r.label,
            r.probability, r.method, r.patch, r.stride, r.layer, r.images,
        )  # fmt: skip

    def filters(self, model: str, layer: str = "", *, version: int = 0) -> Filters:
        """A convolution layer's kernels [K, K, in, out] and biases (the first layer's when
        `layer` is empty)."""
        response = self.stub.GetFilters(
            pb.GetFiltersRequest(model=model, version=version, layer=layer), timeout=self.timeout
        )
        return Filters(
            response.model,
            response.version,
            response.layer,
            _array(response.kernels),
            _array(response.biases),
        )

    def summary(self, model: str, version: int = 0) -> pb.GetParameterSummaryResponse:
        response: pb.GetParameterSummaryResponse = self.stub.GetParameterSummary(
            pb.GetParameterSummaryRequest(model=model, version=version), timeout=self.timeout
        )
        return response

    def metadata(self, model: str, version: int = 0) -> pb.GetModelMetadataResponse:
        response: pb.GetModelMetadataResponse = self.stub.GetModelMetadata(
            pb.GetModelMetadataRequest(model=model, version=version), timeout=self.timeout
        )
        return response

    def rollout(self, model: str) -> pb.GetRolloutResponse:
        """The model's rollout: policy, state, agreement, each version's figures, the latest
        disagreements."""
        response: pb.GetRolloutResponse = self.stub.GetRollout(
            pb.GetRolloutRequest(model=model), timeout=self.timeout
        )
        return response

    def list_models(self) -> pb.ListModelsResponse:
        response: pb.ListModelsResponse = self.stub.ListModels(
            pb.ListModelsRequest(), timeout=self.timeout
        )
        return response

    def health(self, service: str = "") -> str:
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
