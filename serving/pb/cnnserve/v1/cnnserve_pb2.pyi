from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_FLOAT32: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "images", "top_k", "omit_probabilities", "id", "client_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OMIT_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: Tensor
    top_k: int
    omit_probabilities: bool
    id: str
    client_key: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., omit_probabilities: _Optional[bool] = ..., id: _Optional[str] = ..., client_key: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "probabilities", "classifications")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    probabilities: Tensor
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictStreamResponse(_message.Message):
    __slots__ = ("response", "error", "id")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    response: PredictResponse
    error: Status
    id: str
    def __init__(self, response: _Optional[_Union[PredictResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., id: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "pixels")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    pixels: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., pixels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "images", "top_k", "client_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    client_key: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., client_key: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "classifications")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class GetParameterSummaryRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("name", "kind", "output_shape", "parameters", "formula", "kernel", "strides", "padding", "activation", "output_size_formula")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FORMULA_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FORMULA_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    parameters: int
    formula: str
    kernel: _containers.RepeatedScalarFieldContainer[int]
    strides: _containers.RepeatedScalarFieldContainer[int]
    padding: str
    activation: str
    output_size_formula: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., parameters: _Optional[int] = ..., formula: _Optional[str] = ..., kernel: _Optional[_Iterable[int]] = ..., strides: _Optional[_Iterable[int]] = ..., padding: _Optional[str] = ..., activation: _Optional[str] = ..., output_size_formula: _Optional[str] = ...) -> None: ...

class GetParameterSummaryResponse(_message.Message):
    __slots__ = ("model", "version", "input_shape", "layers", "total_parameters", "trainable_parameters", "non_trainable_parameters", "dense_neuron_parameters", "dense_neuron_formula", "keras_parameters", "precision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NON_TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DENSE_NEURON_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DENSE_NEURON_FORMULA_FIELD_NUMBER: _ClassVar[int]
    KERAS_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSummary]
    total_parameters: int
    trainable_parameters: int
    non_trainable_parameters: int
    dense_neuron_parameters: int
    dense_neuron_formula: str
    keras_parameters: int
    precision: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[_Union[LayerSummary, _Mapping]]] = ..., total_parameters: _Optional[int] = ..., trainable_parameters: _Optional[int] = ..., non_trainable_parameters: _Optional[int] = ..., dense_neuron_parameters: _Optional[int] = ..., dense_neuron_formula: _Optional[str] = ..., keras_parameters: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class GetFeatureMapsRequest(_message.Message):
    __slots__ = ("model", "version", "image", "layers", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    image: Image
    layers: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class FeatureMap(_message.Message):
    __slots__ = ("name", "kind", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    values: Tensor
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetFeatureMapsResponse(_message.Message):
    __slots__ = ("model", "version", "layers", "classification", "probabilities", "image")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layers: _containers.RepeatedCompositeFieldContainer[FeatureMap]
    classification: Classification
    probabilities: Tensor
    image: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[FeatureMap, _Mapping]]] = ..., classification: _Optional[_Union[Classification, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., image: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetFiltersRequest(_message.Message):
    __slots__ = ("model", "version", "layer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layer: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layer: _Optional[str] = ...) -> None: ...

class GetFiltersResponse(_message.Message):
    __slots__ = ("model", "version", "layer", "kernels", "biases")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    BIASES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layer: str
    kernels: Tensor
    biases: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layer: _Optional[str] = ..., kernels: _Optional[_Union[Tensor, _Mapping]] = ..., biases: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "version", "tensor", "image", "class_index", "method", "patch", "stride")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    tensor: Tensor
    image: Image
    class_index: int
    method: str
    patch: int
    stride: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., class_index: _Optional[int] = ..., method: _Optional[str] = ..., patch: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "version", "heat", "class_index", "label", "probability", "method", "patch", "stride", "layer", "images", "image")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEAT_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    heat: Tensor
    class_index: int
    label: str
    probability: float
    method: str
    patch: int
    stride: int
    layer: str
    images: int
    image: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., heat: _Optional[_Union[Tensor, _Mapping]] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., method: _Optional[str] = ..., patch: _Optional[int] = ..., stride: _Optional[int] = ..., layer: _Optional[str] = ..., images: _Optional[int] = ..., image: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "role")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: str
    reason: str
    role: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "default_version", "versions", "precision", "rollout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_version: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    precision: str
    rollout: RolloutPolicy
    def __init__(self, name: _Optional[str] = ..., default_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., precision: _Optional[str] = ..., rollout: _Optional[_Union[RolloutPolicy, _Mapping]] = ...) -> None: ...

class RollbackBounds(_message.Message):
    __slots__ = ("after", "min_agreement", "max_error_rate", "max_p99_ratio")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    MIN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    after: int
    min_agreement: float
    max_error_rate: float
    max_p99_ratio: float
    def __init__(self, after: _Optional[int] = ..., min_agreement: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., max_p99_ratio: _Optional[float] = ...) -> None: ...

class RolloutPolicy(_message.Message):
    __slots__ = ("state", "stable", "candidate", "mode", "canary_percent", "rollback", "reason", "file", "file_error", "since")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    FILE_ERROR_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    state: str
    stable: int
    candidate: int
    mode: str
    canary_percent: float
    rollback: RollbackBounds
    reason: str
    file: str
    file_error: str
    since: float
    def __init__(self, state: _Optional[str] = ..., stable: _Optional[int] = ..., candidate: _Optional[int] = ..., mode: _Optional[str] = ..., canary_percent: _Optional[float] = ..., rollback: _Optional[_Union[RollbackBounds, _Mapping]] = ..., reason: _Optional[str] = ..., file: _Optional[str] = ..., file_error: _Optional[str] = ..., since: _Optional[float] = ...) -> None: ...

class VersionRollout(_message.Message):
    __slots__ = ("version", "role", "calls", "errors", "error_rate", "p50_ms", "p99_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    version: int
    role: str
    calls: int
    errors: int
    error_rate: float
    p50_ms: float
    p99_ms: float
    def __init__(self, version: _Optional[int] = ..., role: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ...) -> None: ...

class Disagreement(_message.Message):
    __slots__ = ("time", "image", "stable", "candidate", "stable_probabilities", "candidate_probabilities")
    TIME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    STABLE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    time: float
    image: Tensor
    stable: ClassScore
    candidate: ClassScore
    stable_probabilities: Tensor
    candidate_probabilities: Tensor
    def __init__(self, time: _Optional[float] = ..., image: _Optional[_Union[Tensor, _Mapping]] = ..., stable: _Optional[_Union[ClassScore, _Mapping]] = ..., candidate: _Optional[_Union[ClassScore, _Mapping]] = ..., stable_probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., candidate_probabilities: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetRolloutResponse(_message.Message):
    __slots__ = ("model", "policy", "compared", "agreed", "agreement", "mean_abs_diff", "shed", "versions", "disagreements")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: RolloutPolicy
    compared: int
    agreed: int
    agreement: float
    mean_abs_diff: float
    shed: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionRollout]
    disagreements: _containers.RepeatedCompositeFieldContainer[Disagreement]
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[_Union[RolloutPolicy, _Mapping]] = ..., compared: _Optional[int] = ..., agreed: _Optional[int] = ..., agreement: _Optional[float] = ..., mean_abs_diff: _Optional[float] = ..., shed: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionRollout, _Mapping]]] = ..., disagreements: _Optional[_Iterable[_Union[Disagreement, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class GetModelMetadataResponse(_message.Message):
    __slots__ = ("name", "version", "ready_versions", "inputs", "outputs", "accepted_dtypes", "input_layout", "input_scale", "class_names", "dataset", "test_accuracy", "execution_provider", "properties", "max_batch_size", "precision", "role", "rollout")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    INPUT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ready_versions: _containers.RepeatedScalarFieldContainer[int]
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    input_layout: str
    input_scale: float
    class_names: _containers.RepeatedScalarFieldContainer[str]
    dataset: str
    test_accuracy: float
    execution_provider: str
    properties: _containers.ScalarMap[str, str]
    max_batch_size: int
    precision: str
    role: str
    rollout: RolloutPolicy
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ready_versions: _Optional[_Iterable[int]] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., input_layout: _Optional[str] = ..., input_scale: _Optional[float] = ..., class_names: _Optional[_Iterable[str]] = ..., dataset: _Optional[str] = ..., test_accuracy: _Optional[float] = ..., execution_provider: _Optional[str] = ..., properties: _Optional[_Mapping[str, str]] = ..., max_batch_size: _Optional[int] = ..., precision: _Optional[str] = ..., role: _Optional[str] = ..., rollout: _Optional[_Union[RolloutPolicy, _Mapping]] = ...) -> None: ...
