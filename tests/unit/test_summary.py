"""serving.core.summary: the parameter arithmetic of a dense graph and the output-size formulas of
convolutions and pools, checked against the shapes ONNX Runtime computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from harness import write_tiny_cnn, write_tiny_model
from serving.core.summary import initializers, size_formula, summarize


def test_summary_of_a_plain_dense_graph(tmp_path: Path) -> None:
    s = summarize(write_tiny_model(tmp_path / "m.onnx"))
    assert [(layer.kind, layer.parameters) for layer in s.layers] == [("Flatten", 0), ("Dense", 51)]
    assert s.layers[1].formula == "(16 + 1) * 3 = 51" and s.layers[1].activation == "softmax"
    assert s.dense_neuron_parameters == 17


VALID = (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("size", "conv", "pool", "expected"),
    [
        # valid, stride 1: the design notes' conv1 and pool1
        (
            28,
            (3, 1, VALID),
            (2, 2, VALID),
            ["(28 - 3 + 2*0)/1 + 1 = 26", "floor((26 - 2)/2) + 1 = 13"],
        ),
        # valid, stride 2, a division that is not exact
        (
            10,
            (3, 2, VALID),
            (2, 2, VALID),
            ["floor((10 - 3 + 2*0)/2) + 1 = 4", "floor((4 - 2)/2) + 1 = 2"],
        ),
        # same (explicit symmetric pads), stride 1: the size stays
        (
            9,
            (3, 1, (1, 1, 1, 1)),
            (3, 1, (1, 1, 1, 1)),
            ["(9 - 3 + 2*1)/1 + 1 = 9", "floor((9 - 3 + 2*1)/1) + 1 = 9"],
        ),
        # same (auto_pad), stride 2: ceil(W/S); an odd total pads the odd pixel after
        (
            9,
            (3, 2, "SAME_UPPER"),
            (2, 2, "SAME_UPPER"),
            ["(9 - 3 + 2*1)/2 + 1 = 5", "floor((5 - 2 + 0 + 1)/2) + 1 = 3"],
        ),
        (
            8,
            (3, 2, "SAME_UPPER"),
            (2, 1, "SAME_UPPER"),
            ["(8 - 3 + 0 + 1)/2 + 1 = 4", "floor((4 - 2 + 0 + 1)/1) + 1 = 4"],
        ),
    ],
)
def test_output_size_formulas(
    tmp_path: Path,
    size: int,
    conv: tuple[int, int, object],
    pool: tuple[int, int, object],
    expected: list[str],
) -> None:
    path = write_tiny_cnn(tmp_path / "m.onnx", h=size, w=size, conv=conv, pool=pool)  # type: ignore[arg-type]
    layers = summarize(path).layers
    assert [x.output_size_formula for x in layers[:2]] == expected
    # The formula's result is the shape ONNX Runtime computes.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((1, size, size, 2), np.float32)})[0].shape == (1, 3)
    flatten = layers[2]
    oh, ow, channels = layers[1].output_shape
    assert flatten.output_size_formula == f"{oh}*{ow}*{channels} = {oh * ow * channels}"
    assert int(expected[1].rsplit("= ", 1)[1]) == oh
    assert layers[0].padding == ("valid" if conv[2] == VALID else "same")


def test_size_formula_of_a_rectangle_names_both_dimensions(tmp_path: Path) -> None:
    path = write_tiny_cnn(tmp_path / "m.onnx", h=12, w=7)
    assert summarize(path).layers[0].output_size_formula == (
        "height (12 - 3 + 2*0)/1 + 1 = 10; width (7 - 3 + 2*0)/1 + 1 = 5"
    )
    assert size_formula(7, 2, 2, 0, 0, pool=True) == "floor((7 - 2)/2) + 1 = 3"


def test_a_quantized_graph_reads_as_the_network_it_came_from(tmp_path: Path) -> None:
    """ONNX Runtime's static QDQ quantization of a small CNN (as `make train` makes the INT8
    twin): the same layers, counts and activations; weights read as int8 times scale."""
    from onnx import numpy_helper
    from onnxruntime import quantization as q

    fp32 = write_tiny_cnn(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(0)

    class Images(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.left = [{"image": rng.random((4, 9, 9, 2), dtype=np.float32)} for _ in range(4)]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.left.pop() if self.left else None

    int8 = tmp_path / "int8.onnx"
    q.quantize_static(str(fp32), str(int8), Images(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8,
                      extra_options={"QDQKeepRemovableActivations": True})  # fmt: skip
    plain, quantized = summarize(fp32), summarize(int8)
    described = [(la.name, la.kind, la.output_shape, la.parameters, la.formula, la.activation)
                 for la in plain.layers]  # fmt: skip
    assert [
        (la.name, la.kind, la.output_shape, la.parameters, la.formula, la.activation)
        for la in quantized.layers
    ] == described
    model = onnx.load(str(int8))
    inits = initializers(model)
    conv = quantized.layers[0]
    dq = next(n for n in model.graph.node if n.output[0] == conv.weight)
    raw = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert dq.op_type == "DequantizeLinear" and raw[dq.input[0]].dtype == np.int8
    expected = raw[dq.input[0]].astype(np.float32) * raw[dq.input[1]][:, None, None, None]
    np.testing.assert_array_equal(numpy_helper.to_array(inits[conv.weight]), expected)
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32)).graph.initializer}
    fp32_weight = original[plain.layers[0].weight]
    assert np.abs(expected - fp32_weight).max() <= raw[dq.input[1]].max() / 2 + 1e-7
    # Outputs are followed through each QuantizeLinear -> DequantizeLinear pair: the values
    # the next layer reads, which ONNX Runtime can return.
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[conv.output] == "DequantizeLinear"
