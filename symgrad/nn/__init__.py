"""A drop-in PyTorch API over symgrad's generated Triton kernels.

``symgrad.nn.Linear``, ``LayerNorm``, ``CrossEntropyLoss``... are torch's modules (same
constructor, defaults, parameters and ``state_dict`` keys) whose forward runs the generated
kernels; ``symgrad.nn.functional`` holds ``torch.nn.functional``'s signatures; ``patch(model)``
swaps a model's matching torch modules in place. CUDA tensors run compiled; CPU tensors run
through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before triton is imported.
"""
from . import functional
from ._kernels import Unsupported
from .modules import (BCEWithLogitsLoss, Conv2d, CrossEntropyLoss, GELU, LayerNorm, Linear, LogSoftmax, MSELoss,
                      RMSNorm, SiLU, Softmax, SwiGLU)
from .patch import Patched, patch

__all__ = [
    "functional", "Unsupported", "patch", "Patched",
    "Linear", "Conv2d", "GELU", "SiLU", "Softmax", "LogSoftmax", "LayerNorm", "RMSNorm", "SwiGLU",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "MSELoss",
]
