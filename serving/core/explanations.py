"""Heat maps of what a prediction looked at: occlusion sensitivity and closed-form Grad-CAM.

Occlusion slides a black patch (pixel 0, the datasets' background) over the image: every
position is one image of a batch that runs through the version's batcher and session, as
Predict's images do, and a pixel's heat is the mean fall of the class's probability over the
positions whose patch covers it. It needs nothing of the graph, so it works for every model.

Grad-CAM (Selvaraju et al., 2017) weights the last convolution's activation maps by the mean
gradient of the class's score (the logit, before the softmax) with respect to each map, keeps
the positive part and resizes it to the input (bilinear, half-pixel centres, as
`tf.image.resize`). No TensorFlow at serve time: for a graph that ends last convolution ->
flatten -> dense layers (relu or none) -> softmax, that gradient is closed-form from the dense
layers' weights (the ONNX initializers) and the activations (the feature-map session exposes
them). `CamGraph.read` finds that chain in the ONNX graph, or says why it is not there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from serving.core.summary import Layer, ParameterSummary
from serving.errors import FailedPrecondition, InvalidArgument

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
OCCLUSION = "occlusion"
GRAD_CAM = "grad_cam"
METHODS = (OCCLUSION, GRAD_CAM)
DEFAULT_PATCH = 4  # 13x13 positions on 28x28 (169 + 1 images), 15x15 on 32x32
DEFAULT_STRIDE = 2
# Between the last convolution and the flatten: layout moves only. Shape-reading nodes (tf2onnx
# computes the flatten's target from the value's shape) are not on the value's path.
_PASS_THROUGH = frozenset({"Identity", "Transpose"})
_SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Explanation:
    """One image's heat map for one class, and what was done to get it."""

    heat: F32  # [H, W], the model's input size
    class_index: int
    probability: float  # of the class, for the unchanged image
    method: str
    patch: int  # occlusion's parameters; 0 for Grad-CAM
    stride: int
    layer: str  # Grad-CAM's convolution layer; "" for occlusion
    images: int  # images run
    image: npt.NDArray[np.uint8]  # [H, W, C]: the image as the model saw it


def check_method(method: str) -> str:
    method = method or OCCLUSION
    if method not in METHODS:
        raise InvalidArgument(
            f"unknown explanation method {method!r}; expected one of: {', '.join(METHODS)}"
        )
    return method


def check_one(name: str, version: int, shape: tuple[int, int, int], got: tuple[int, ...]) -> None:
    """One image as Predict takes it: [1, H, W, C] or [H, W, C] at the model's size `shape`."""
    h, w, c = shape
    if tuple(got) not in ((1, h, w, c), (h, w, c)):
        raise InvalidArgument(
            f"an image of shape {list(got)} does not fit model {name!r} v{version}: expected "
            f"one image, [1, {h}, {w}, {c}] or [{h}, {w}, {c}]"
        )


def one_image(
    image: npt.NDArray[np.generic], shape: tuple[int, int, int]
) -> npt.NDArray[np.generic]:
    """A Predict-style image checked by `check_one`, as [H, W, C] (uint8 or float32)."""
    if image.dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise InvalidArgument(f"dtype {image.dtype} not accepted; expected uint8 or float32")
    return image.reshape(shape)


def as_pixels(
    pixels: npt.NDArray[np.generic], scale: float, offset: float
) -> npt.NDArray[np.uint8]:
    """The uint8 pixels an image stands for (float32 model input scaled back), to draw over."""
    if pixels.dtype == np.uint8:
        return pixels  # type: ignore[return-value]
    scaled = (pixels.astype(np.float64) - offset) / scale
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def occlusion_grid(shape: tuple[int, int, int], patch: int, stride: int) -> tuple[int, int]:
    """Patch and stride (0: the defaults, the patch capped to the image's shorter side),
    checked against an image of `shape` [H, W, C]."""
    h, w, _ = shape
    patch = patch or min(DEFAULT_PATCH, h, w)
    stride = stride or min(DEFAULT_STRIDE, patch)
    if patch > h or patch > w:
        raise InvalidArgument(
            f"occlusion patch of {patch} pixels is larger than the image ({h}x{w}); "
            f"expected 1..{min(h, w)}"
        )
    if stride > max(h, w):
        raise InvalidArgument(
            f"occlusion stride of {stride} pixels is larger than the image ({h}x{w})"
        )
    return patch, stride


def positions(size: int, patch: int, stride: int) -> list[int]:
    """Where a patch starts along one side: every `stride` pixels, and one flush with the far
    edge when the stride does not land there, so that every pixel is covered."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_images(h: int, w: int, patch: int, stride: int) -> int:
    """Images one explanation runs: every patch position and the unchanged image."""
    return len(positions(h, patch, stride)) * len(positions(w, patch, stride)) + 1


def occluded_batch(x: F32, patch: int, stride: int, fill: float) -> F32:
    """[1 + positions, H, W, C]: the unchanged image `x` ([1, H, W, C]) first, then one copy per
    patch position (rows, then columns) with the patch set to `fill`."""
    _, h, w, _ = x.shape
    rows, cols = positions(h, patch, stride), positions(w, patch, stride)
    batch = np.repeat(x, 1 + len(rows) * len(cols), axis=0)
    i = 1
    for r in rows:
        for c in cols:
            batch[i, r : r + patch, c : c + patch, :] = fill
            i += 1
    return batch


def occlusion_heat(
    probabilities: F32, cls: int, size: tuple[int, int], patch: int, stride: int
) -> F32:
    """Each pixel's mean fall of the class's probability over the patches that covered it,
    from the probabilities of `occluded_batch`'s images, in its order; `size` is (H, W)."""
    h, w = size
    fall = probabilities[0, cls].astype(np.float64) - probabilities[1:, cls].astype(np.float64)
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    i = 0
    for r in positions(h, patch, stride):
        for c in positions(w, patch, stride):
            total[r : r + patch, c : c + patch] += fall[i]
            count[r : r + patch, c : c + patch] += 1
            i += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def resize_bilinear(values: F64, h: int, w: int) -> F64:
    """[h0, w0] -> [h, w], bilinear with half-pixel centres and clamped edges: what
    `tf.image.resize(..., "bilinear")` (and Keras's Grad-CAM example) does."""

    def axis(n_in: int, n_out: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], F64]:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        low = np.floor(src)
        frac = src - low
        lo = np.clip(low, 0, n_in - 1).astype(np.intp)
        hi = np.clip(low + 1, 0, n_in - 1).astype(np.intp)
        return lo, hi, frac

    r0, r1, fr = axis(values.shape[0], h)
    c0, c1, fc = axis(values.shape[1], w)
    top = values[r0][:, c0] + (values[r0][:, c1] - values[r0][:, c0]) * fc
    bottom = values[r1][:, c0] + (values[r1][:, c1] - values[r1][:, c0]) * fc
    out: F64 = top + (bottom - top) * fr[:, None]
    return out


@dataclass(frozen=True)
class Dense:
    weight: F64  # [in, out]
    bias: F64  # [out]
    relu: bool


@dataclass(frozen=True)
class CamGraph:
    """The part of a graph Grad-CAM needs: the last convolution layer, how the flatten orders
    its NCHW values, and the dense layers after it."""

    layer: Layer
    perm: tuple[int, ...]  # the transposes' composition, NCHW -> the order flattened
    dense: tuple[Dense, ...]

    @staticmethod
    def read(path: Path, summary: ParameterSummary) -> CamGraph:
        """The chain after the last convolution, read from the ONNX file; FailedPrecondition
        naming what is in the way when the graph is not one Grad-CAM is closed-form for."""
        convs = [x for x in summary.layers if x.kind == "Conv2D" and x.output]
        if not convs:
            raise FailedPrecondition(
                "grad_cam needs a convolution layer and this model has none (its layers: "
                f"{', '.join(x.name for x in summary.layers) or 'none'}); occlusion works for "
                "every model"
            )
        layer = convs[-1]
        graph = onnx.load(str(path)).graph
        inits = {i.name: i for i in graph.initializer}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        outputs = {o.name for o in graph.output}

        def why(what: str) -> FailedPrecondition:
            return FailedPrecondition(
                f"grad_cam is closed-form for graphs that end last convolution -> flatten -> "
                f"dense layers (relu or none) -> softmax; after {layer.name}, {what}; "
                "occlusion works for every model"
            )

        def next_node(value: str) -> onnx.NodeProto:
            if value in outputs:
                raise why(f"{value!r} is an output of the graph")
            found = [n for n in consumers.get(value, []) if n.op_type not in _SHAPE_READERS]
            if len(found) != 1:
                raise why(f"{value!r} feeds {len(found)} operators, not one")
            return found[0]

        perm: tuple[int, ...] = (0, 1, 2, 3)
        node = next_node(layer.output)
        while node.op_type in _PASS_THROUGH:
            if node.op_type == "Transpose":
                step: list[int] = list(_attr(node, "perm", [3, 2, 1, 0]))  # type: ignore[call-overload]
                perm = tuple(perm[int(a)] for a in step)
            node = next_node(node.output[0])
        if node.op_type not in ("Reshape", "Flatten"):
            raise why(f"a {node.op_type} comes where a flatten should")
        value = node.output[0]
        dense: list[Dense] = []
        while True:
            node = next_node(value)
            if node.op_type == "Softmax":
                if node.output[0] not in outputs or not dense:
                    raise why("the softmax is not the graph's output after a dense layer")
                break
            if node.op_type != "MatMul" or node.input[0] != value or node.input[1] not in inits:
                raise why(f"a {node.op_type} comes where a dense layer should")
            weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            value = node.output[0]
            bias = np.zeros(weight.shape[1])
            node = next_node(value)
            if node.op_type == "Add":
                other = [i for i in node.input if i != value]
                if len(other) != 1 or other[0] not in inits:
                    raise why("a dense layer's bias is not a constant")
                bias = bias + numpy_helper.to_array(inits[other[0]]).astype(np.float64)
                value = node.output[0]
                node = next_node(value)
            relu = node.op_type == "Relu"
            if relu:
                value = node.output[0]
            dense.append(Dense(weight, bias.reshape(-1), relu))
        size = int(np.prod(layer.output_shape))
        if dense[0].weight.shape[0] != size:
            taken = dense[0].weight.shape[0]
            raise why(f"the first dense layer takes {taken} values, not {size}")
        if dense[-1].relu:
            raise why("the last dense layer has a relu before the softmax")
        return CamGraph(layer, perm, tuple(dense))

    def explain(self, activation: F32, cls: int, size: tuple[int, int]) -> tuple[F32, F32]:
        """The Grad-CAM map of class `cls` at the input's `size` (h, w) from the layer's
        activation [h, w, K], and the probabilities the closed form computes (to check it
        against the graph's own)."""
        nchw = activation.astype(np.float64).transpose(2, 0, 1)[None]
        flat = nchw.transpose(self.perm).reshape(-1)
        values, masks = flat, []
        for layer in self.dense:
            z = values @ layer.weight + layer.bias
            masks.append(z > 0)
            values = np.maximum(z, 0) if layer.relu else z
        logits = values
        grad = np.zeros_like(logits)
        grad[cls] = 1.0
        for layer, mask in zip(reversed(self.dense), reversed(masks), strict=True):
            if layer.relu:
                grad = grad * mask
            grad = layer.weight @ grad
        # Back from the flattened order to NCHW, then [K, h, w].
        shaped = np.empty(nchw.shape).transpose(self.perm).shape
        grad_nchw = grad.reshape(shaped).transpose(np.argsort(self.perm))[0]
        weights = grad_nchw.mean(axis=(1, 2))  # one per activation map
        cam = np.maximum(np.tensordot(weights, nchw[0], axes=1), 0)
        e = np.exp(logits - logits.max())
        return (
            resize_bilinear(cam, *size).astype(np.float32),
            (e / e.sum()).astype(np.float32),
        )


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
