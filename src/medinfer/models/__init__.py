"""Model cards (``model.yaml``) and model loaders behind one :class:`Model` protocol.

Heavy imports (torch, MONAI, onnxruntime) happen inside the loader functions.
"""

from medinfer.models.card import (
    Activation,
    ArchitectureSpec,
    Blending,
    InferenceMode,
    InferenceSpec,
    InputSpec,
    LabelSpec,
    ModelCard,
    Network,
    OutputSpec,
    Task,
    WeightFormat,
    WeightsSpec,
)
from medinfer.models.loaders import (
    Device,
    Model,
    build_network,
    bundled_models,
    load_model,
    load_onnx,
    load_state_dict_model,
    load_torchscript,
    resolve_device,
    resolve_model,
)

__all__ = [
    "Activation",
    "ArchitectureSpec",
    "Blending",
    "Device",
    "InferenceMode",
    "InferenceSpec",
    "InputSpec",
    "LabelSpec",
    "Model",
    "ModelCard",
    "Network",
    "OutputSpec",
    "Task",
    "WeightFormat",
    "WeightsSpec",
    "build_network",
    "bundled_models",
    "load_model",
    "load_onnx",
    "load_state_dict_model",
    "load_torchscript",
    "resolve_device",
    "resolve_model",
]
