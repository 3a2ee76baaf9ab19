"""dsv3: DeepSeek-V3 in PyTorch — exact to the official checkpoint, from a 1M-parameter test model to 671B."""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DsV3Error, RequestError
from .inference.generate import generate
from .model.options import InferenceOptions
from .model.transformer import DeepSeekV3

__all__ = [
    "ModelConfig",
    "DeepSeekV3",
    "InferenceOptions",
    "generate",
    "DsV3Error",
    "ConfigError",
    "CheckpointError",
    "RequestError",
]
__version__ = "0.1.0"
