"""dmfast: weakly supervised thoracic disease localization with disease masks, with fused C++/CUDA ops.

Importing the package loads the compiled extension, which registers the ops under ``torch.ops.dmfast``;
``dmfast.ops`` holds the documented Python entry points. ``dmfast.load_model(path)`` loads a trained model for
inference (:func:`dmfast.inference.load_model`).
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers fake kernels and autograd formulas)
from .errors import DataError, DicomError, Error, ImageError, ModelFileError, SettingsError  # noqa: E402,F401
from .ops import affine_matrix, affine_smooth, attention_cam, cam_boxes, mask_attention  # noqa: E402,F401

# the public API: a trained model (load_model -> Model: predict, __call__, classes), the fused ops, and the errors
# a user's inputs can cause (dmfast.Error and its kinds)
__all__ = ["load_model", "affine_matrix", "affine_smooth", "attention_cam", "cam_boxes", "mask_attention", "ops",
           "Error", "SettingsError", "DataError", "ImageError", "DicomError", "ModelFileError", "__version__"]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name == "load_model":  # imported on first use: models and torchvision are not needed to use the ops
        from .inference import load_model

        return load_model
    raise AttributeError(f"module 'dmfast' has no attribute {name!r}")
