"""Parameter summary read from the ONNX graph that serves, in Keras's terms.

The graph is walked in order; weight-carrying and shape-changing operators become layers
(Conv -> Conv2D, MaxPool -> MaxPooling2D, Reshape/Flatten to 2-D -> Flatten, MatMul/Gemm
(+ bias Add) -> Dense), activations attach to the layer before them, and layout plumbing
(the NHWC<->NCHW transposes tf2onnx inserts) is skipped. Shapes are tracked in NHWC, as
Keras prints them, so the counts and shapes equal `model.summary()` for the design-notes CNN.
Each layer also says how its output size follows from its input's (the design notes'
O = (W - K + 2P)/S + 1), and which ONNX values hold its output and weights (feature maps and
filters are read from those).

A quantized (QDQ) graph reads as the network it was quantized from: its integer weights are
taken at the float values they stand for (`initializers`), and a layer's output is followed
through the QuantizeLinear -> DequantizeLinear pair after it, so its feature maps are the
values the INT8 model computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ACTIVATIONS = {"Relu": "relu", "Softmax": "softmax", "Sigmoid": "sigmoid", "Tanh": "tanh"}


@dataclass
class Layer:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    parameters: int
    formula: str
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: str = ""
    activation: str = ""
    output_size_formula: str = ""
    output: str = ""  # the ONNX value of the layer's output (after its activation), NCHW for maps
    weight: str = ""  # the initializers of its weights and bias, as ONNX lays them out
    bias: str = ""


@dataclass
class ParameterSummary:
    input_shape: tuple[int, int, int]
    layers: list[Layer] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def trainable(self) -> int:
        return self.total  # the exported graphs hold no frozen (non-trainable) weights

    @property
    def dense_neuron_parameters(self) -> int:
        h, w, c = self.input_shape
        return h * w * c + 1

    @property
    def dense_neuron_formula(self) -> str:
        h, w, c = self.input_shape
        return f"{h}*{w}*{c} + 1 = {self.dense_neuron_parameters:,}"


def _layer_name(node: onnx.NodeProto) -> str:
    """tf2onnx names nodes `<model>/<layer>_<n>/<op>`; the layer is the second part."""
    parts = node.name.split("/")
    if len(parts) >= 3:
        return re.sub(r"_\d+$", "", parts[1])
    return node.name or node.op_type


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass(frozen=True)
class Spatial:
    """How a convolution or pooling maps its input's height and width to its output's."""

    out: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]  # (before, after) for height, then width
    padding: str  # valid | same | pads [...]

    def formula(self, size: tuple[int, int], kernel: tuple[int, int], pool: bool) -> str:
        """The arithmetic of the output size, once when height and width share it."""
        parts = [
            size_formula(size[d], kernel[d], self.strides[d], *self.pads[d], pool=pool)
            for d in (0, 1)
        ]
        same_numbers = (size[0], kernel[0], self.strides[0], self.pads[0]) == (
            size[1],
            kernel[1],
            self.strides[1],
            self.pads[1],
        )
        return parts[0] if same_numbers else f"height {parts[0]}; width {parts[1]}"


def size_formula(
    size: int, kernel: int, stride: int, before: int, after: int, *, pool: bool
) -> str:
    """O = (W - K + 2P)/S + 1 with the layer's own numbers; floor() where the division is not
    exact (Keras drops what does not fill a last window) and always for pooling, as the design
    notes write it. Keras's `same` pads what keeps ceil(W/S) outputs, an odd pixel after."""
    padded = size - kernel + before + after
    out = padded // stride + 1
    pad = f"2*{before}" if before == after else f"{before} + {after}"
    inner = f"{size} - {kernel}" if pool and before == after == 0 else f"{size} - {kernel} + {pad}"
    if pool or padded % stride:
        return f"floor(({inner})/{stride}) + 1 = {out}"
    return f"({inner})/{stride} + 1 = {out}"


def _spatial(node: onnx.NodeProto, h: int, w: int, kh: int, kw: int) -> Spatial:
    a = _attrs(node)
    strides: tuple[int, ...] = tuple(a.get("strides", [1, 1]))  # type: ignore[arg-type]
    sh, sw = int(strides[0]), int(strides[1])
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        oh, ow = -(-h // sh), -(-w // sw)
        pads = []
        for size, k, stride, out in ((h, kh, sh, oh), (w, kw, sw, ow)):
            total = max((out - 1) * stride + k - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return Spatial((oh, ow), (sh, sw), (pads[0], pads[1]), "same")
    p = [int(x) for x in a.get("pads", [0, 0, 0, 0])]  # type: ignore[attr-defined]
    pads_hw = ((p[0], p[2]), (p[1], p[3]))
    oh = (h - kh + p[0] + p[2]) // sh + 1
    ow = (w - kw + p[1] + p[3]) // sw + 1
    if not any(p):
        padding = "valid"
    elif (oh, ow) == (-(-h // sh), -(-w // sw)):
        padding = "same"
    else:
        padding = f"pads {p}"
    return Spatial((oh, ow), (sh, sw), pads_hw, padding)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's constants by name, plus, for each DequantizeLinear of constants (a quantized
    weight or bias), its float values under its output's name: (q - zero_point) * scale, per
    channel along `axis` when the scale is a vector."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in inputs):
            continue
        q = numpy_helper.to_array(inits[inputs[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[inputs[1]]).astype(np.float32)
        zero = (
            numpy_helper.to_array(inits[inputs[2]]).astype(np.float32)
            if len(inputs) > 2
            else np.zeros_like(scale)
        )
        if scale.ndim == 1 and q.ndim > 1:
            axis = int(_attrs(node).get("axis", 1))  # type: ignore[call-overload]
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        inits[node.output[0]] = numpy_helper.from_array((q - zero) * scale, node.output[0])
    return inits


def summarize(model: onnx.ModelProto | Path) -> ParameterSummary:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    inits = initializers(model)
    quantized = ""  # the QuantizeLinear output of the last layer's output, in a QDQ graph
    dims = graph.input[0].type.tensor_type.shape.dim
    h, w, c = (int(d.dim_value) for d in dims[1:4])
    summary = ParameterSummary(input_shape=(h, w, c))
    shape: tuple[int, ...] = (h, w, c)
    last: Layer | None = None

    for node in graph.node:
        op = node.op_type
        if op == "Conv":
            weight = inits.get(node.input[1])
            if weight is None:
                continue
            cout, cin_per_group, kh, kw = (int(d) for d in weight.dims)
            bias = len(node.input) > 2 and node.input[2] in inits
            spatial = _spatial(node, shape[0], shape[1], kh, kw)
            size_formula_ = spatial.formula((shape[0], shape[1]), (kh, kw), pool=False)
            groups = int(_attrs(node).get("group", 1))  # type: ignore[call-overload]
            params = cout * cin_per_group * kh * kw + (cout if bias else 0)
            formula = (
                f"({kh}*{kw}*{cin_per_group} + 1) * {cout} = {params:,}"
                if bias
                else f"{kh}*{kw}*{cin_per_group} * {cout} = {params:,}"
            )
            if groups > 1:
                formula += f" ({groups} groups)"
            shape = (*spatial.out, cout)
            last = Layer(
                _layer_name(node),
                "Conv2D",
                shape,
                params,
                formula,
                (kh, kw),
                spatial.strides,
                spatial.padding,
                output_size_formula=size_formula_,
                output=node.output[0],
                weight=node.input[1],
                bias=node.input[2] if bias else "",
            )
            summary.layers.append(last)
        elif op in ("MaxPool", "AveragePool"):
            a = _attrs(node)
            kh, kw = (int(k) for k in a["kernel_shape"])  # type: ignore[attr-defined]
            spatial = _spatial(node, shape[0], shape[1], kh, kw)
            size_formula_ = spatial.formula((shape[0], shape[1]), (kh, kw), pool=True)
            shape = (*spatial.out, shape[2])
            kind = "MaxPooling2D" if op == "MaxPool" else "AveragePooling2D"
            last = Layer(
                _layer_name(node),
                kind,
                shape,
                0,
                "0 (no weights)",
                (kh, kw),
                spatial.strides,
                spatial.padding,
                output_size_formula=size_formula_,
                output=node.output[0],
            )
            summary.layers.append(last)
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            shape = (shape[-1],)
            kind = "GlobalAveragePooling2D" if op == "GlobalAveragePool" else "GlobalMaxPooling2D"
            last = Layer(_layer_name(node), kind, shape, 0, "0 (no weights)", output=node.output[0])
            summary.layers.append(last)
        elif op in ("Flatten", "Reshape") and len(shape) == 3 and _flattens(node, inits):
            product = "*".join(map(str, shape))
            shape = (int(np.prod(shape)),)
            last = Layer(
                _layer_name(node),
                "Flatten",
                shape,
                0,
                "0 (reshape only)",
                output_size_formula=f"{product} = {shape[0]:,}",
                output=node.output[0],
            )
            summary.layers.append(last)
        elif op in ("MatMul", "Gemm"):
            weight = inits.get(node.input[1])
            if weight is None or len(weight.dims) != 2:
                continue
            n_in, n_out = (int(d) for d in weight.dims)
            if op == "Gemm" and int(_attrs(node).get("transB", 0)):  # type: ignore[call-overload]
                n_in, n_out = n_out, n_in
            bias = op == "Gemm" and len(node.input) > 2 and node.input[2] in inits
            params = n_in * n_out + (n_out if bias else 0)
            shape = (n_out,)
            last = Layer(
                _layer_name(node),
                "Dense",
                shape,
                params,
                _dense_formula(n_in, n_out, bias),
                output=node.output[0],
                weight=node.input[1],
                bias=node.input[2] if bias else "",
            )
            summary.layers.append(last)
        elif (
            op == "Add" and last is not None and last.kind == "Dense" and "+ 1" not in last.formula
        ):
            if any(i in inits and _numel(inits[i]) == shape[-1] for i in node.input):
                n_out = shape[-1]
                n_in = (last.parameters) // n_out
                last.parameters += n_out
                last.formula = _dense_formula(n_in, n_out, True)
                last.output = node.output[0]
                last.bias = next(i for i in node.input if i in inits)
        elif op == "QuantizeLinear" and last is not None and node.input[0] == last.output:
            quantized = node.output[0]
        elif op == "DequantizeLinear" and last is not None and node.input[0] == quantized:
            last.output = node.output[0]  # what the next layer reads, as INT8 computes it
        elif op in ACTIVATIONS and last is not None and not last.activation:
            last.activation = ACTIVATIONS[op]
            if node.input and node.input[0] == last.output:
                last.output = node.output[0]
    return summary


def _dense_formula(n_in: int, n_out: int, bias: bool) -> str:
    params = n_in * n_out + (n_out if bias else 0)
    if bias:
        return f"({n_in} + 1) * {n_out} = {params:,}"
    return f"{n_in} * {n_out} = {params:,}"


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def _flattens(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Reshape flattens unless its target is a constant of rank other than 2 (layout moves)."""
    if node.op_type == "Flatten":
        return True
    target = inits.get(node.input[1]) if len(node.input) > 1 else None
    if target is None:
        return True  # computed from the input's shape: Keras's Flatten does exactly this
    return len(numpy_helper.to_array(target)) == 2
