"""The data plane every protocol shares: resolve -> admit -> validate -> batch -> run -> top-k,
and what the protocols report of the repository (readiness, versions, statistics).

A feature or a fix here lands once for our own API, the Open Inference Protocol and REST.
Servicers and handlers talk to this and nothing below it. Knows nothing of gRPC, HTTP or protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from serving.config import DEFAULTS, MiB
from serving.core import explanations, images
from serving.core.admission import PER_CALL_BYTES, Ticket, request_cost

# Re-exported: what the protocols see of the core, so that they import the data plane only
# (the reservation taken before a message is read, the version `resolve` hands them, and the
# types their message builders read).
from serving.core.admission import RESERVATION as RESERVATION  # noqa: PLC0414
from serving.core.admission import RESERVING as RESERVING  # noqa: PLC0414
from serving.core.admission import Admission as Admission  # noqa: PLC0414
from serving.core.explanations import Explanation as Explanation  # noqa: PLC0414
from serving.core.inspection import MAP_KINDS
from serving.core.repository import MODEL_FILE as MODEL_FILE  # noqa: PLC0414
from serving.core.repository import BatchingOptions as BatchingOptions  # noqa: PLC0414
from serving.core.repository import ModelRepository
from serving.core.repository import ServedVersion as ServedVersion  # noqa: PLC0414
from serving.core.repository import State as State  # noqa: PLC0414
from serving.core.rollout import Policy as Policy  # noqa: PLC0414
from serving.core.routing import RolloutStatus as RolloutStatus  # noqa: PLC0414
from serving.core.routing import Route as Route  # noqa: PLC0414
from serving.core.routing import Router
from serving.core.statistics import Duration as Duration  # noqa: PLC0414
from serving.core.statistics import ModelCatalog as ModelCatalog  # noqa: PLC0414
from serving.core.statistics import Statistics as Statistics  # noqa: PLC0414
from serving.core.statistics import VersionStats as VersionStats  # noqa: PLC0414
from serving.core.summary import Layer
from serving.core.summary import ParameterSummary as ParameterSummary  # noqa: PLC0414
from serving.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServingError

F32 = npt.NDArray[np.float32]
ACCEPTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


@dataclass(frozen=True)
class Limits:
    max_request_batch: int = DEFAULTS.max_request_batch
    max_image_pixels: int = DEFAULTS.max_image_pixels
    # The float32 values of one feature-map answer.
    max_feature_map_bytes: int = DEFAULTS.max_feature_map_bytes
    # Images one explanation may run (occlusion: its patch positions and the unchanged image).
    max_explain_images: int = DEFAULTS.max_explain_images


@dataclass(frozen=True)
class TopK:
    indices: npt.NDArray[np.int64]  # [N, k], best first
    scores: F32  # [N, k]


def top_k(probabilities: F32, k: int) -> TopK:
    k = max(1, min(k, probabilities.shape[1]))
    if k == 1:  # the common case, without take_along_axis's index building
        best = probabilities.argmax(axis=1).astype(np.int64, copy=False)
        rows = np.arange(len(best))
        return TopK(best[:, None], probabilities[rows, best][:, None])
    part = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(probabilities, part, axis=1).argsort(axis=1)[:, ::-1]
    idx = np.take_along_axis(part, order, axis=1)
    return TopK(idx.astype(np.int64), np.take_along_axis(probabilities, idx, axis=1))


@dataclass(frozen=True)
class Prediction:
    probabilities: F32  # [N, classes]
    top: TopK | None  # the best classes of each image, when they were asked for


@dataclass(frozen=True)
class LayerMap:
    name: str
    kind: str
    values: F32  # [H, W, channels]


@dataclass(frozen=True)
class FeatureMaps:
    """One image's activations, layer by layer, and the prediction of the same run."""

    layers: list[LayerMap]
    image: npt.NDArray[np.uint8]  # [H, W, C]: the image as the model saw it
    probabilities: F32  # [classes]
    top: TopK  # [1, k]


@dataclass(frozen=True)
class Filters:
    layer: str
    kernels: F32  # [K, K, in, out]
    biases: F32  # [out]


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        limits: Limits,
        stats: Statistics | None = None,
        admission: Admission | None = None,
        *,
        on_explain: Callable[[str, str], None] | None = None,
        router: Router | None = None,
    ) -> None:
        self.repository = repository
        self.limits = limits
        self.stats = stats or Statistics()
        self.admission = admission or Admission(1 << 62, 1 << 62)
        self._on_explain = on_explain  # (model, method) of each explanation answered
        # Which version answers a call without one (rollout policies), and the copies.
        self.router = router or Router(repository, self.admission)

    def admit(self, served: ServedVersion, shape: tuple[int, ...], itemsize: int) -> Ticket:
        """Before a tensor's bytes are touched: its shape checked against the model, then its
        cost held against the server's budget and the model's queue (`Unavailable` when it
        would pass either). `itemsize` 0 (a dtype decoding will refuse) holds nothing."""
        if not itemsize:
            return Ticket(self.admission, 0)
        with self._counted_if_refused(served):
            self.check_shape(served, shape)
            return self._hold(served, shape[0], itemsize, 0)

    def admit_images(self, served: ServedVersion, count: int, encoded_bytes: int) -> Ticket:
        """The same for encoded images (Classify), before they are decoded: their bytes, and the
        model-sized pixels, float32 input and outputs they become."""
        with self._counted_if_refused(served):
            self._check_count(count)
            return self._hold(served, count, 1, 2 * encoded_bytes)

    def _hold(self, served: ServedVersion, images: int, itemsize: int, extra: int) -> Ticket:
        info = served.runtime.info
        h, w, c = info.input_shape
        cost = extra + request_cost(images, h * w * c, itemsize, info.num_classes)
        return self.admission.admit(served.name, served.batcher, images, cost)

    @contextlib.contextmanager
    def _counted_if_refused(self, served: ServedVersion) -> Iterator[None]:
        """A request refused at admission is a failed request of its version, as one refused
        in `predict` is."""
        try:
            yield
        except ServingError:
            self.stats.finished(served, 0, 0.0, ok=False)
            raise

    def _check_count(self, count: int) -> None:
        if count > self.limits.max_request_batch:
            raise InvalidArgument(
                f"{count} images is over the limit of {self.limits.max_request_batch} per request"
            )

    # What the protocols report of the repository -------------------------------------------

    @property
    def batching(self) -> BatchingOptions:
        return self.repository.batching

    @property
    def max_versions(self) -> int:
        return self.repository.max_versions

    def ready_versions(self, model: str) -> list[int]:
        return self.repository.ready_versions(model)

    def is_ready(self, model: str, version: int = 0) -> bool:
        return self.repository.is_ready(model, version)

    def catalog(self) -> list[ModelCatalog]:
        """Every model on disk, its versions' states and which of them serve."""
        out = []
        for name, statuses in self.repository.statuses().items():
            ready = self.repository.ready_versions(name)
            default = self.router.default_version(name)
            precision = ""
            if ready and (not default or default in ready):
                precision = self.repository.get(name, default).runtime.info.precision
            out.append(
                ModelCatalog(name, statuses, ready, precision, default, self.router.status(name))
            )
        return out

    def rollout(self, model: str) -> RolloutStatus:
        """A model's rollout: its policy, state, measurements and latest disagreements."""
        if not model:
            raise InvalidArgument("no model named in the request")
        if model not in self.repository.model_names():
            self.repository.get(model)  # NOT_FOUND, naming the models there are
        status = self.router.status(model)
        default = self.router.default_version(model)
        if not self.repository.is_ready(model, default):
            return status
        names = self.repository.get(model, default).runtime.info.class_names
        return dataclasses.replace(status, class_names=tuple(names))

    def route(self, model: str, version: int = 0, client: str = "") -> Route:
        """The version that answers an inference (the rollout policy's choice when `version`
        is 0; `client`: the caller's key, for a sticky canary) and the one that gets a copy."""
        self._check_names(model, version)
        return self.router.route(model, version, client)

    def statistics(
        self, model: str = "", version: int | None = None
    ) -> list[tuple[str, int, VersionStats]]:
        """Counters of one version (0: the newest), of every ready version of one model (no
        `version`), or of every ready version of every model (neither); an unknown model is
        NOT_FOUND, as for an inference."""
        if model:
            if version is not None:
                served = self.resolve(model, version)
                wanted = [(served.name, served.version)]
            else:
                self.repository.get(model)  # NOT_FOUND or UNAVAILABLE
                wanted = [(model, v) for v in self.repository.ready_versions(model)]
        elif version is not None:
            raise InvalidArgument("a model version was given without a model name")
        else:
            wanted = [
                (n, v)
                for n in self.repository.model_names()
                for v in self.repository.ready_versions(n)
            ]
        return [(n, v, self.stats.get(n, v)) for n, v in wanted]

    def resolve(self, model: str, version: int = 0) -> ServedVersion:
        """The version a call names; 0: the rollout policy's stable, or the newest."""
        self._check_names(model, version)
        return self.repository.get(model, version or self.router.default_version(model))

    def _check_names(self, model: str, version: int) -> None:
        if not model:
            known = ", ".join(self.repository.model_names()) or "none"
            raise InvalidArgument(f"no model named in the request; available models: {known}")
        if version < 0:
            raise InvalidArgument(f"version must be >= 0 (0: newest), got {version}")

    def check_batch(self, served: ServedVersion, pixels: npt.NDArray[np.generic]) -> None:
        if pixels.dtype not in ACCEPTED_DTYPES:
            raise InvalidArgument(f"dtype {pixels.dtype} not accepted; expected uint8 or float32")
        self.check_shape(served, pixels.shape)

    def check_shape(self, served: ServedVersion, shape: tuple[int, ...]) -> None:
        h, w, c = served.runtime.info.input_shape
        if len(shape) != 4 or shape[1:] != (h, w, c):
            raise InvalidArgument(
                f"images of shape {list(shape)} do not fit model {served.name!r} v"
                f"{served.version}: expected [N, {h}, {w}, {c}] (NHWC)"
            )
        n = shape[0]
        if n <= 0:
            what = "empty batch" if n == 0 else f"batch of {n} images"
            raise InvalidArgument(f"{what}: expected [N, {h}, {w}, {c}] with N >= 1")
        if n > self.limits.max_request_batch:
            raise InvalidArgument(
                f"batch of {n} images is over the limit of {self.limits.max_request_batch} per request"
            )

    async def predict(
        self,
        served: ServedVersion,
        pixels: npt.NDArray[np.generic],
        top: int = 0,
        route: Route | None = None,
    ) -> Prediction:
        """Probabilities of a batch, and (`top` >= 1) its `top` best classes per image. `route`
        (from `route`, for `served`): counted in the model's rollout, and its copy sent."""
        started = time.perf_counter()
        try:
            self.check_batch(served, pixels)
            x = served.runtime.prepare(pixels)
            # Scaled uint8 pixels are always finite: only float32 input needs the check.
            if pixels.dtype == np.float32 and not np.isfinite(x).all():
                raise InvalidArgument("float32 images contain NaN or infinite values")
            try:
                out = await served.infer(x)
            except Exception:  # the version failed, not the caller's input
                if route is not None and route.role:
                    self.router.failed(route, time.perf_counter() - started)
                raise
        except BaseException:  # counted as failed, whatever it was (cancellation included)
            self.stats.finished(served, 0, time.perf_counter() - started, ok=False)
            raise
        seconds = time.perf_counter() - started
        self.stats.finished(served, len(out), seconds, ok=True)
        if route is not None and route.role:
            self.router.answered(route, x, pixels, out, seconds=seconds)
        return Prediction(out, top_k(out, top) if top > 0 else None)

    def decode_images(
        self, served: ServedVersion, encoded: list[bytes | npt.NDArray[np.uint8]]
    ) -> npt.NDArray[np.uint8]:
        """Encoded images or raw pixel arrays -> one uint8 NHWC batch at the model's size."""
        if not encoded:
            raise InvalidArgument("no images in the request")
        self._check_count(len(encoded))
        shape = served.runtime.info.input_shape
        batch = np.empty((len(encoded), *shape), dtype=np.uint8)
        for i, item in enumerate(encoded):
            if isinstance(item, bytes):
                img = images.open_encoded(item, i, self.limits.max_image_pixels)
            else:
                if item.size > self.limits.max_image_pixels * 4:
                    raise InvalidArgument(f"image {i}: {item.size:,} values, over the pixel limit")
                img = images.from_pixels(item, i)
            batch[i] = images.fit(img, shape, i)
        return batch

    # Inside the model ----------------------------------------------------------------------

    async def feature_maps(
        self,
        served: ServedVersion,
        image: bytes | npt.NDArray[np.uint8],
        layers: Sequence[str] = (),
        top: int = 1,
        request_bytes: int = 0,
    ) -> FeatureMaps:
        """The activations of `layers` (all convolution and pooling layers when empty) for one
        image, from the version's feature-map session. Refused before any work when the answer
        would pass `max_feature_map_bytes`; held against the budget like an inference."""
        summary = await served.parameter_summary()
        chosen = self._map_layers(served, summary, layers)
        nbytes = sum(4 * math.prod(layer.output_shape) for layer in chosen)
        cap = self.limits.max_feature_map_bytes
        if nbytes > cap:
            largest = max(chosen, key=lambda layer: math.prod(layer.output_shape))
            raise ResourceExhausted(
                f"the feature maps of {len(chosen)} layers ({', '.join(x.name for x in chosen)}) "
                f"are {_size(nbytes)} as float32, over the cap of {_size(cap)} "
                f"(--max-feature-map-mb); ask for fewer layers (the largest, {largest.name}, is "
                f"{_size(4 * math.prod(largest.output_shape))})"
            )
        h, w, c = served.runtime.info.input_shape
        # The request twice (message and its bytes), the input, and the maps twice (the arrays
        # and their encoded copy).
        cost = 2 * request_bytes + 5 * h * w * c + 2 * nbytes + PER_CALL_BYTES
        with self.admission.admit(served.name, None, 1, cost):
            batch = await asyncio.to_thread(self.decode_images, served, [image])
            x = served.runtime.prepare(batch)
            session = await served.feature_map_session()
            probabilities, maps = await asyncio.to_thread(session.run, x, chosen)
        return FeatureMaps(
            [LayerMap(layer.name, layer.kind, m) for layer, m in zip(chosen, maps, strict=True)],
            batch[0],
            probabilities,
            top_k(probabilities[None, :], top),
        )

    @staticmethod
    def _map_layers(
        served: ServedVersion, summary: ParameterSummary, names: Sequence[str]
    ) -> list[Layer]:
        known = [layer for layer in summary.layers if layer.kind in MAP_KINDS and layer.output]
        if not names:
            return known
        by_name = {layer.name: layer for layer in known}
        listed = ", ".join(by_name) or "none"
        chosen: list[Layer] = []
        for name in dict.fromkeys(names):  # each once, in the order asked
            if name not in by_name:
                kinds = "convolution and pooling"
                raise _not_one_of(
                    served, summary, name, what="feature maps", kinds=kinds, known=listed
                )
            chosen.append(by_name[name])
        order = {layer.name: i for i, layer in enumerate(known)}
        return sorted(chosen, key=lambda layer: order[layer.name])

    async def explain(
        self,
        served: ServedVersion,
        image: bytes | npt.NDArray[np.generic],
        *,
        tensor: bool = False,
        method: str = "",
        class_index: int | None = None,
        patch: int = 0,
        stride: int = 0,
        request_bytes: int = 0,
    ) -> Explanation:
        """A heat map of what made the model answer class `class_index` (None: its best) for
        one image: encoded bytes or raw uint8 pixels of any size (resized, as Classify's), or
        (`tensor`) a Predict-style array at the model's size. Occlusion's images run as one
        batch through the version's batcher, held by admission as a whole and capped by
        `max_explain_images`; Grad-CAM runs the feature-map session once."""
        started = time.perf_counter()
        try:
            method = explanations.check_method(method)
            info = served.runtime.info
            shape = info.input_shape
            n = info.num_classes
            if class_index is not None and not 0 <= class_index < n:
                raise InvalidArgument(
                    f"class {class_index} is out of range: model {served.name!r} v"
                    f"{served.version} has {n} classes, 0..{n - 1}"
                )
            if method == explanations.GRAD_CAM:
                cam = await served.cam_graph()  # FailedPrecondition before any work
                patch = stride = 0
                count = 1
            else:
                patch, stride = explanations.occlusion_grid(shape, patch, stride)
                count = explanations.occlusion_images(shape[0], shape[1], patch, stride)
            cap = self.limits.max_explain_images
            if count > cap:
                raise ResourceExhausted(
                    f"occlusion with patch {patch} and stride {stride} on {shape[0]}x{shape[1]} "
                    f"runs {count:,} images, over the cap of {cap:,} per explanation "
                    "(--max-explain-images); use a larger stride or patch"
                )
            if isinstance(image, np.ndarray) and tensor:
                explanations.check_one(served.name, served.version, shape, image.shape)
            cost = 2 * request_bytes + request_cost(count, math.prod(shape), 4, n)
            queue = served.batcher if method == explanations.OCCLUSION else None
            with self.admission.admit(served.name, queue, count, cost):
                if isinstance(image, np.ndarray) and tensor:
                    pixels = explanations.one_image(image, shape)
                else:
                    one = [image]  # bytes, or raw pixels of any size
                    pixels = (await asyncio.to_thread(self.decode_images, served, one))[0]  # type: ignore[arg-type]
                x = served.runtime.prepare(pixels[None])
                if pixels.dtype == np.float32 and not np.isfinite(x).all():
                    raise InvalidArgument("float32 image contains NaN or infinite values")
                seen = explanations.as_pixels(pixels, info.input_scale, info.input_offset)
                if method == explanations.GRAD_CAM:
                    answer = await self._grad_cam(served, cam, x, class_index, seen=seen)
                else:
                    answer = await self._occlusion(served, x, class_index, patch, stride, seen=seen)
        except BaseException:
            self.stats.finished(served, 0, time.perf_counter() - started, ok=False)
            raise
        self.stats.finished(served, count, time.perf_counter() - started, ok=True)
        if self._on_explain is not None:
            self._on_explain(served.name, method)
        return answer

    async def _occlusion(
        self,
        served: ServedVersion,
        x: F32,
        cls: int | None,
        patch: int,
        stride: int,
        *,
        seen: npt.NDArray[np.uint8],
    ) -> Explanation:
        fill = served.runtime.info.input_offset  # pixel 0, scaled
        batch = explanations.occluded_batch(x, patch, stride, fill)
        probabilities = await served.infer(batch)
        best = int(probabilities[0].argmax()) if cls is None else cls
        heat = explanations.occlusion_heat(probabilities, best, x.shape[1:3], patch, stride)
        return Explanation(
            heat, best, float(probabilities[0, best]), explanations.OCCLUSION, patch, stride,
            "", len(batch), seen,
        )  # fmt: skip

    async def _grad_cam(
        self,
        served: ServedVersion,
        cam: explanations.CamGraph,
        x: F32,
        cls: int | None,
        *,
        seen: npt.NDArray[np.uint8],
    ) -> Explanation:
        session = await served.feature_map_session()
        probabilities, (activation,) = await asyncio.to_thread(session.run, x, [cam.layer])
        best = int(probabilities.argmax()) if cls is None else cls
        heat, closed = cam.explain(activation, best, x.shape[1:3])
        gap = float(np.abs(closed - probabilities).max())
        if gap > 1e-4:  # the chain read from the graph is not what the graph computes
            raise FailedPrecondition(
                f"grad_cam's closed form after {cam.layer.name} gives probabilities {gap:.2g} "
                f"away from model {served.name!r} v{served.version}'s own; occlusion works "
                "for every model"
            )
        return Explanation(
            heat, best, float(probabilities[best]), explanations.GRAD_CAM, 0, 0,
            cam.layer.name, 1, seen,
        )  # fmt: skip

    async def summary(self, served: ServedVersion) -> ParameterSummary:
        """The version's parameter and output-size summary (read from its graph once)."""
        return await served.parameter_summary()

    async def filters(self, served: ServedVersion, layer: str = "") -> Filters:
        """The kernels [K, K, in, out] and biases of one convolution layer (the first when
        `layer` is empty)."""
        summary = await served.parameter_summary()
        convs = {x.name: x for x in summary.layers if x.kind == "Conv2D" and x.weight}
        if not convs:
            raise InvalidArgument(
                f"model {served.name!r} v{served.version} has no convolution layer"
            )
        if not layer:
            layer = next(iter(convs))
        if layer not in convs:
            raise _not_one_of(
                served, summary, layer, what="filters", kinds="convolution", known=", ".join(convs)
            )
        chosen = convs[layer]
        nbytes = 4 * chosen.parameters
        cap = self.limits.max_feature_map_bytes
        if nbytes > cap:
            raise ResourceExhausted(
                f"the filters of {layer} are {_size(nbytes)} as float32, over the cap of "
                f"{_size(cap)} (--max-feature-map-mb)"
            )
        kernels, biases = await served.filters(chosen)
        return Filters(layer, kernels, biases)


def _size(nbytes: int) -> str:
    if nbytes < 10 * 1024:
        return f"{nbytes:,} bytes"
    if nbytes < MiB:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / MiB:.1f} MiB"


def _not_one_of(
    served: ServedVersion,
    summary: ParameterSummary,
    name: str,
    *,
    what: str,
    kinds: str,
    known: str,
) -> InvalidArgument:
    """A layer name that `what` (feature maps, filters) cannot come from, and the ones it can."""
    other = next((x for x in summary.layers if x.name == name), None)
    found = f"is a {other.kind} layer" if other else "is not a layer"
    return InvalidArgument(
        f"{name!r} {found} of model {served.name!r} v{served.version}; {what} come from its "
        f"{kinds} layers: {known}"
    )
