"""The inference.GRPCInferenceService servicer: the Open Inference Protocol (KServe v2) and the
read-only Triton extensions (ModelConfig, ModelStatistics, RepositoryIndex).

Same data plane, repository, error codes, messages and metrics as our own API: a model runs
through `DataPlane.predict` whichever protocol asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from serving.core.dataplane import DataPlane
from serving.grpc import inference_messages as messages
from serving.grpc.streams import StreamMethod, Streams, serve_stream
from serving.metrics import Call, Metrics
from serving.pb.inference import grpc_predict_v2_pb2 as v2

Ctx = grpc.aio.ServicerContext


class GRPCInferenceServiceServicer:
    """inference.GRPCInferenceService; each unary method gets its call's labels from the guard."""

    def __init__(
        self, plane: DataPlane, metrics: Metrics, ready: Callable[[], bool], streams: Streams
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.streams = streams
        self._ready = ready  # the server's own readiness rule (the overall health status)
        self._version = messages.server_version()
        self._stream = StreamMethod("ModelStreamInfer", self._infer_one, self._stream_error)

    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: Ctx, call: Call
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: Ctx, call: Call
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._ready())

    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: Ctx, call: Call
    ) -> v2.ModelReadyResponse:
        # The per-model health status: SERVING exactly when a version is ready.
        version = messages.parse_v2_version(request.version)
        return v2.ModelReadyResponse(ready=self.plane.is_ready(request.name, version))

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: Ctx, call: Call
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name=messages.SERVER_NAME, version=self._version, extensions=messages.EXTENSIONS
        )

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: Ctx, call: Call
    ) -> v2.ModelMetadataResponse:
        served = call.resolve(self.plane, request.name, messages.parse_v2_version(request.version))
        return messages.v2_model_metadata(served, self.plane.ready_versions(served.name))

    async def _infer(
        self, request: v2.ModelInferRequest, call: Call, out: v2.ModelInferResponse | None = None
    ) -> v2.ModelInferResponse:
        version = messages.parse_v2_version(request.model_version)
        key = messages.v2_client_key(request)
        served = call.route_to(self.plane, request.model_name, version, key)
        # Held against the budget from its shape, before its bytes are touched.
        with self.plane.admit(served, *messages.v2_input_extent(request)):
            pixels = messages.decode_v2_input(request, served)
            top = messages.v2_requested_top(request, served)
            prediction = await self.plane.predict(served, pixels, top, call.route)
            return messages.v2_infer_response(served, request.id, prediction, out)

    async def _infer_one(
        self, request: v2.ModelInferRequest, index: int, call: Call
    ) -> v2.ModelStreamInferResponse:
        answer = v2.ModelStreamInferResponse()
        await self._infer(request, call, answer.infer_response)
        return answer

    @staticmethod
    def _stream_error(
        request: v2.ModelInferRequest | None, index: int, code: grpc.StatusCode, message: str
    ) -> v2.ModelStreamInferResponse:
        return messages.v2_stream_error(request, code.name, message)

    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: Ctx, call: Call
    ) -> v2.ModelInferResponse:
        return await self._infer(request, call)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[v2.ModelInferRequest], context: Ctx
    ) -> None:
        await serve_stream(request_iterator, context, self._stream, self.streams, self.metrics)

    async def ModelConfig(
        self, request: v2.ModelConfigRequest, context: Ctx, call: Call
    ) -> v2.ModelConfigResponse:
        served = call.resolve(self.plane, request.name, messages.parse_v2_version(request.version))
        plane = self.plane
        return messages.v2_model_config(
            served, plane.batching, plane.max_versions, plane.limits.max_request_batch
        )

    async def ModelStatistics(
        self, request: v2.ModelStatisticsRequest, context: Ctx, call: Call
    ) -> v2.ModelStatisticsResponse:
        version = messages.parse_v2_version(request.version) if request.version else None
        counted = self.plane.statistics(request.name, version)
        if request.name:
            call.model = request.name
        return v2.ModelStatisticsResponse(
            model_stats=[messages.v2_model_statistics(n, v, stats) for n, v, stats in counted]
        )

    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context: Ctx, call: Call
    ) -> v2.RepositoryIndexResponse:
        # cnnserve serves one repository: `repository_name` selects nothing.
        return messages.v2_repository_index(self.plane.catalog(), request.ready)
