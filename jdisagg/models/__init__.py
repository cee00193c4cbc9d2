"""Models jdisagg serves: the Llama family built in, anything implementing ``ServingModel`` brought along."""

from jdisagg.models.config import ModelConfig
from jdisagg.models.llama import Llama
from jdisagg.models.loading import (
    init_model,
    load_hf_model,
    restore_checkpoint,
    save_checkpoint,
    save_hf_safetensors,
)
from jdisagg.models.protocol import ServingModel

__all__ = [
    "Llama",
    "ModelConfig",
    "ServingModel",
    "init_model",
    "load_hf_model",
    "restore_checkpoint",
    "save_checkpoint",
    "save_hf_safetensors",
]
