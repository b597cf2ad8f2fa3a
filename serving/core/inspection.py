"""The inside of a served model: the activations of its convolution and pooling layers for one
image, and the kernels of a convolution layer.

Activations come from a second ONNX Runtime session over the same file, whose graph also
outputs the layers' values (`summary.Layer.output`): the serving session keeps the exported
graph, so Predict never computes or copies an intermediate value it does not need. That second
session runs on the CPU with one thread: it answers one image at a time, for people looking at
a model, and needs neither the GPU's memory nor the cores the serving runs use.

ONNX's Conv and pooling operators are NCHW whatever layout the Keras model had (tf2onnx puts
its transposes around them), so every value read here is NCHW, and leaves as H, W, C.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from serving.core.summary import Layer, ParameterSummary, initializers

F32 = npt.NDArray[np.float32]
MAP_KINDS = frozenset({"Conv2D", "MaxPooling2D", "AveragePooling2D"})


class FeatureMapSession:
    """A session of the served graph with every convolution and pooling output exposed."""

    def __init__(self, path: Path, summary: ParameterSummary) -> None:
        model = onnx.load(str(path))
        graph = model.graph
        self.layers = [layer for layer in summary.layers if layer.kind in MAP_KINDS]
        present = {o.name for o in graph.output}
        for layer in self.layers:
            if layer.output and layer.output not in present:
                # No shape: ONNX Runtime infers it, and the batch dimension stays dynamic.
                graph.output.append(
                    helper.make_tensor_value_info(layer.output, TensorProto.FLOAT, None)
                )
                present.add(layer.output)
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
        )

    def run(self, x: F32, layers: list[Layer]) -> tuple[F32, list[F32]]:
        """One image's probabilities [classes] and the values of `layers`, each [H, W, C]."""
        names = [self.output_name, *(layer.output for layer in layers)]
        outs = self.session.run(names, {self.input_name: x})
        maps = []
        for layer, value in zip(layers, outs[1:], strict=True):
            if value.ndim != 4:
                raise ValueError(f"layer {layer.name}: expected an NCHW value, got {value.shape}")
            maps.append(np.ascontiguousarray(value[0].transpose(1, 2, 0), dtype=np.float32))
        return np.asarray(outs[0][0], dtype=np.float32), maps


def read_filters(path: Path, layer: Layer) -> tuple[F32, F32]:
    """A convolution layer's kernels as Keras holds them, [K, K, in, out] (ONNX keeps
    [out, in, K, K]), and its biases [out]: zeros when the graph has none (tf2onnx drops a bias
    that is all zeros, which adds nothing). An INT8 model's are its integers dequantized: the
    values it computes with."""
    inits = initializers(onnx.load(str(path)))  # an INT8 graph's kernels, dequantized
    weight = numpy_helper.to_array(inits[layer.weight]).astype(np.float32, copy=False)
    kernels = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
    if layer.bias:
        biases = numpy_helper.to_array(inits[layer.bias]).astype(np.float32, copy=False)
    else:
        biases = np.zeros(kernels.shape[3], dtype=np.float32)
    return kernels, np.ascontiguousarray(biases.reshape(-1))
