"""The cnnserve.v1.CnnServe servicer."""

from __future__ import annotations

import asyncio

import grpc

from serving import codec
from serving.api.calls import Call, rpc
from serving.inference import DataPlane, top_k
from serving.metrics import Metrics
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from serving.summary import ParameterSummary, summarize

Ctx = grpc.aio.ServicerContext


class CnnServeServicer(pb_grpc.CnnServeServicer):
    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane = plane
        self.metrics = metrics
        self._summaries: dict[tuple[str, int, int], ParameterSummary] = {}

    @rpc("Predict")
    async def Predict(
        self, request: pb.PredictRequest, context: Ctx, call: Call
    ) -> pb.PredictResponse:
        served = call.resolve(self.plane, request.model, request.version)
        pixels = codec.decode_tensor(request.images)
        probabilities = await self.plane.predict(served, pixels)
        top = top_k(probabilities, request.top_k or 1)
        return codec.predict_response(served, probabilities, top, request.omit_probabilities)

    @rpc("Classify")
    async def Classify(
        self, request: pb.ClassifyRequest, context: Ctx, call: Call
    ) -> pb.ClassifyResponse:
        served = call.resolve(self.plane, request.model, request.version)
        items = codec.decode_classify_images(request)
        # Decoding images is CPU work: keep it off the event loop.
        batch = await asyncio.to_thread(self.plane.decode_images, served, items)
        probabilities = await self.plane.predict(served, batch)
        return codec.classify_response(served, top_k(probabilities, request.top_k or 1))

    @rpc("GetParameterSummary")
    async def GetParameterSummary(
        self, request: pb.GetParameterSummaryRequest, context: Ctx, call: Call
    ) -> pb.GetParameterSummaryResponse:
        served = call.resolve(self.plane, request.model, request.version)
        key = (served.name, served.version, id(served.runtime))
        summary = self._summaries.get(key)
        if summary is None:
            summary = await asyncio.to_thread(summarize, served.runtime.path)
            self._summaries[key] = summary
        return codec.summary_response(served, summary)

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Ctx, call: Call
    ) -> pb.ListModelsResponse:
        return codec.list_models_response(self.plane.repository)

    @rpc("GetModelMetadata")
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Ctx, call: Call
    ) -> pb.GetModelMetadataResponse:
        served = call.resolve(self.plane, request.model, request.version)
        ready = self.plane.repository.ready_versions(served.name)
        return codec.metadata_response(served, ready, self.plane.limits.max_request_batch)
