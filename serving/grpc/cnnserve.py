"""The cnnserve.v1.CnnServe servicer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from serving.core.dataplane import DataPlane
from serving.grpc import cnnserve_messages as messages
from serving.grpc.streams import StreamMethod, Streams, serve_stream
from serving.metrics import Call, Metrics
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb

Ctx = grpc.aio.ServicerContext


class CnnServeServicer:
    """cnnserve.v1.CnnServe; each unary method gets its call's labels from the guard."""

    def __init__(self, plane: DataPlane, metrics: Metrics, streams: Streams) -> None:
        self.plane = plane
        self.metrics = metrics
        self.streams = streams
        self._stream = StreamMethod("PredictStream", self._predict_one, self._predict_stream_error)

    async def _predict_one(
        self, request: pb.PredictRequest, index: int, call: Call
    ) -> pb.PredictStreamResponse:
        answer = messages.predict_stream_answer(request, index)
        await self._predict(request, call, answer.response)
        return answer

    @staticmethod
    def _predict_stream_error(
        request: pb.PredictRequest | None, index: int, code: grpc.StatusCode, message: str
    ) -> pb.PredictStreamResponse:
        return messages.predict_stream_error(request, index, code.value[0], message)

    async def _predict(
        self, request: pb.PredictRequest, call: Call, out: pb.PredictResponse | None = None
    ) -> pb.PredictResponse:
        served = call.route_to(self.plane, request.model, request.version, request.client_key)
        # Held against the budget from its shape, before its bytes are touched.
        with self.plane.admit(served, *messages.tensor_extent(request.images)):
            pixels = messages.decode_tensor(request.images)
            prediction = await self.plane.predict(served, pixels, request.top_k or 1, call.route)
            return messages.predict_response(served, prediction, request.omit_probabilities, out)

    async def Predict(
        self, request: pb.PredictRequest, context: Ctx, call: Call
    ) -> pb.PredictResponse:
        return await self._predict(request, call)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: Ctx
    ) -> None:
        await serve_stream(request_iterator, context, self._stream, self.streams, self.metrics)

    async def Classify(
        self, request: pb.ClassifyRequest, context: Ctx, call: Call
    ) -> pb.ClassifyResponse:
        served = call.route_to(self.plane, request.model, request.version, request.client_key)
        with self.plane.admit_images(served, *messages.classify_extent(request)):
            items = messages.decode_classify_images(request)
            # Decoding images is CPU work: keep it off the event loop.
            batch = await asyncio.to_thread(self.plane.decode_images, served, items)
            prediction = await self.plane.predict(served, batch, request.top_k or 1, call.route)
            return messages.classify_response(served, prediction)

    async def GetParameterSummary(
        self, request: pb.GetParameterSummaryRequest, context: Ctx, call: Call
    ) -> pb.GetParameterSummaryResponse:
        served = call.resolve(self.plane, request.model, request.version)
        return messages.summary_response(served, await self.plane.summary(served))

    async def GetFeatureMaps(
        self, request: pb.GetFeatureMapsRequest, context: Ctx, call: Call
    ) -> pb.GetFeatureMapsResponse:
        served = call.resolve(self.plane, request.model, request.version)
        image = messages.decode_image(request.image)
        maps = await self.plane.feature_maps(
            served, image, list(request.layers), request.top_k or 1, request.ByteSize()
        )
        return messages.feature_maps_response(served, maps)

    async def GetFilters(
        self, request: pb.GetFiltersRequest, context: Ctx, call: Call
    ) -> pb.GetFiltersResponse:
        served = call.resolve(self.plane, request.model, request.version)
        return messages.filters_response(served, await self.plane.filters(served, request.layer))

    async def Explain(
        self, request: pb.ExplainRequest, context: Ctx, call: Call
    ) -> pb.ExplainResponse:
        served = call.resolve(self.plane, request.model, request.version)
        image, tensor = messages.explain_input(request)
        explanation = await self.plane.explain(
            served,
            image,
            tensor=tensor,
            method=request.method,
            class_index=request.class_index if request.HasField("class_index") else None,
            patch=request.patch,
            stride=request.stride,
            request_bytes=request.ByteSize(),
        )
        return messages.explain_response(served, explanation)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Ctx, call: Call
    ) -> pb.ListModelsResponse:
        return messages.list_models_response(self.plane.catalog())

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Ctx, call: Call
    ) -> pb.GetModelMetadataResponse:
        served = call.resolve(self.plane, request.model, request.version)
        ready = self.plane.ready_versions(served.name)
        return messages.metadata_response(
            served, ready, self.plane.limits.max_request_batch, self.plane.rollout(served.name)
        )

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Ctx, call: Call
    ) -> pb.GetRolloutResponse:
        status = self.plane.rollout(request.model)
        call.model = status.model
        return messages.rollout_response(status)
