"""dinov2-fast: fast, lean DINOv2-style Vision Transformer training on NVIDIA GPUs."""

from dinov2_fast import models, nn, ops
from dinov2_fast._backend import BACKENDS
from dinov2_fast.patch import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["models", "nn", "ops", "BACKENDS", "PatchReport", "patch", "unpatch", "__version__"]
