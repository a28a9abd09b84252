"""Test-session setup that must happen before any test module imports triton."""
import os

# Triton fixes at import time whether @triton.jit kernels run in its CPU interpreter. Decide once
# for the whole session, so the order in which test modules import the generated Triton modules
# cannot matter: compiled where a CUDA GPU is present, interpreted everywhere else.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
