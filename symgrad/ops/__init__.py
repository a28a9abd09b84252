"""The built-in op library. Importing this package registers every op in ``REGISTRY``."""
from . import activations, elementwise, reductions, softmax, losses, linear, norms, conv, optim, clipping, schedules  # noqa: F401
