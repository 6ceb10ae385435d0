"""Trained models at inference: loading a classifier or an alignment module from its checkpoint, running a
classifier on uint8 image batches (probabilities and class activation maps, on aligned images when it was trained
on them), and the portable model file (:func:`export_model`, :func:`load_model`). Shared by ``dmfast train``
(validation, model.pt), ``align`` (perceptual loss), ``masks``, ``eval`` and ``export``."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, checkpoints, ops
from .config import TrainConfig, from_dict
from .data.chestxray14 import FINDINGS
from .data.images import NORMALISATION, load_gray, to_model_input
from .data.splits import Splits
from .models import AlignmentNet, CAMClassifier


def load_classifier(path, device="cpu") -> tuple:
    """A trained classifier from a ``dmfast train`` checkpoint, in eval mode with its disease masks (if it was
    trained with some): ``(model, config, state)``."""
    state = checkpoints.load(path, checkpoints.CLASSIFIER)
    config = from_dict(TrainConfig, state["config"])
    model = CAMClassifier(config.arch, len(FINDINGS), cam_stride=config.cam_stride)
    model.set_masks(state["model"].get("masks"))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, state


def load_aligner(path, device="cpu") -> AlignmentNet:
    """A trained alignment module from a ``dmfast align`` checkpoint, in eval mode."""
    state = checkpoints.load(path, checkpoints.ALIGNMENT)
    net = AlignmentNet(**state["net_config"])
    net.load_state_dict(state["model"])
    return net.to(device).eval()


@dataclass
class Prediction:
    probabilities: torch.Tensor  # [B, C]
    cams: torch.Tensor  # [B, C, h, w], in the frame the model saw (aligned when it was trained aligned)
    theta: torch.Tensor | None  # [B, 2, 3] alignment transforms (aligned frame -> image frame), or None

    def boxes(self, images: list, classes: list, size: int, thresholds, max_boxes: int, names: list) -> tuple:
        """Boxes of the CAM of class ``classes[i]`` on image ``images[i]``, in the pixels of the ``size``-px input
        (maps of aligned images warped back onto it): ``(maps, boxes, scores, counts)`` as ``ops.cam_boxes``, on the
        CPU. A CAM with NaN or inf is an error naming ``names[i]`` and the class."""
        b_index, c_index = torch.tensor(images, device=self.cams.device), torch.tensor(classes, device=self.cams.device)
        theta = self.theta[b_index] if self.theta is not None else None
        maps = to_image_frame(self.cams[b_index, c_index], theta, max(size // 4, 8))  # a quarter of the image size
        boxes, scores, counts = (t.cpu() for t in ops.cam_boxes(maps, (size, size), thresholds, max_boxes))
        if (counts < 0).any():
            i = int(torch.nonzero(counts < 0)[0, 0])
            raise ValueError(f"{names[i]}: the {FINDINGS[classes[i]]} CAM contains NaN or infinite values (a "
                             "diverged model?)")
        return maps, boxes, scores, counts


class Model:
    """A trained classifier (and its alignment module, for an aligned model) at inference:
    ``model(pixels)`` -> :class:`Prediction` for uint8 images ``[B, 1, size, size]``."""

    def __init__(self, model: CAMClassifier, aligner: AlignmentNet | None, size: int, device):
        self.model, self.aligner, self.size, self.device = model, aligner, size, torch.device(device)

    @property
    def masks(self) -> torch.Tensor | None:
        return self.model.masks

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> Prediction:
        images = to_model_input(pixels).to(self.device)
        theta = None
        if self.aligner is not None:
            theta = self.aligner.theta(images)
            images = self.aligner.warp(images, theta)
        logits, cams = self.model(images, cams=True)
        return Prediction(torch.sigmoid(logits).float(), cams.float(), theta)

    def predict(self, images, min_probability: float = 0.5, box_thresholds=(0.5,), max_boxes: int = 1,
                batch: int = 16) -> list:
        """Probabilities, CAMs and boxes for X-rays of any size: ``images`` are image files (PNG, JPEG, ...) or
        2-D uint8 arrays/tensors ``[H, W]``. Each is padded to a centred square (never squashed) and resized to the
        model's input; the boxes of every class whose probability reaches ``min_probability`` come back in the
        image's own pixels. Returns one :class:`ImagePrediction` per image."""
        results = []
        for start in range(0, len(images), batch):
            chunk = [_gray(image) for image in images[start:start + batch]]
            squares = [to_square(gray, self.size) for gray in chunk]
            prediction = self(torch.from_numpy(np.stack([s[0] for s in squares]))[:, None])
            rows = [(b, c) for b in range(len(chunk)) for c in range(len(FINDINGS))
                    if prediction.probabilities[b, c] >= min_probability]
            boxes = scores = counts = None
            if rows:
                names = [f"image {start + b}" for b, _ in rows]
                _, boxes, scores, counts = prediction.boxes([b for b, _ in rows], [c for _, c in rows], self.size,
                                                            box_thresholds, max_boxes, names)
            for b, gray in enumerate(chunk):
                scale, pad_x, pad_y = squares[b][1:]
                found = {}
                for i in (i for i, row in enumerate(rows) if row[0] == b):
                    kept = boxes[i, :min(int(counts[i]), max_boxes)].double() * scale - torch.tensor(
                        [pad_x, pad_y, pad_x, pad_y], dtype=torch.float64)
                    kept = kept.clamp(min=0).minimum(torch.tensor([gray.shape[1], gray.shape[0]] * 2).double())
                    found[FINDINGS[rows[i][1]]] = [box + [score] for box, score in
                                                   zip(kept.tolist(), scores[i, :len(kept)].tolist())]
                results.append(ImagePrediction(gray.shape[1], gray.shape[0],
                                               dict(zip(FINDINGS, prediction.probabilities[b].tolist())), found,
                                               prediction.cams[b].cpu()))
        return results


@dataclass
class ImagePrediction:
    width: int
    height: int
    probabilities: dict  # class -> probability
    boxes: dict  # class -> [[x0, y0, x1, y1, score], ...] in the image's pixels, best first
    cams: torch.Tensor  # [C, h, w], in the model's frame


def _gray(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_gray(image)
    array = image.cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"predict: an image array must be 2-D uint8 [H, W], got {array.dtype} {array.shape}")
    return array


def to_square(gray: np.ndarray, size: int) -> tuple:
    """``gray [H, W]`` padded with black to a centred square and resized to ``size`` (Lanczos, as the image cache):
    ``(pixels [size, size], scale, pad_x, pad_y)``; a point (x, y) of the result is (x * scale - pad_x,
    y * scale - pad_y) in the image."""
    from PIL import Image

    height, width = gray.shape
    side = max(height, width)
    pad_x, pad_y = (side - width) // 2, (side - height) // 2
    square = np.zeros((side, side), np.uint8)
    square[pad_y:pad_y + height, pad_x:pad_x + width] = gray
    if side != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    return square, side / size, pad_x, pad_y


class Classifier(Model):
    """``Classifier(checkpoint)(pixels)`` for a ``dmfast train`` checkpoint, with its config and splits."""

    def __init__(self, checkpoint, device=None):
        self.path = Path(checkpoint)
        device = torch.device(device) if device else ops.default_device()
        model, self.config, state = load_classifier(checkpoint, device)
        self.splits = Splits(**state["splits"])
        aligner = None
        if self.config.aligned:
            if not Path(self.config.aligned).is_file():
                raise FileNotFoundError(f"{checkpoint} was trained on aligned images, but its alignment checkpoint "
                                        f"{self.config.aligned} is missing (export a model file to move a model)")
            aligner = load_aligner(self.config.aligned, device)
        super().__init__(model, aligner, self.config.size, device)


def export_model(source, out, half: bool = False) -> Path:
    """Write the portable model file (format in :mod:`dmfast.checkpoints`) of a ``dmfast train`` checkpoint or run
    folder to ``out``: weights only, the alignment network and anchor embedded; ``half`` stores float16."""
    source = Path(source) / "checkpoint.pt" if Path(source).is_dir() else Path(source)
    model, config, _ = load_classifier(source)
    cast = (lambda state: {k: v.half() if v.is_floating_point() else v for k, v in state.items()}) if half else dict
    aligner = None
    if config.aligned:
        alignment = checkpoints.load(config.aligned, checkpoints.ALIGNMENT)
        anchor = Path(config.aligned).parent / "anchor.pt"
        aligner = {"input_size": alignment["net_config"]["input_size"], "state": cast(alignment["model"]),
                   "anchor": checkpoints.load_anchor(anchor) if anchor.is_file() else None}
    return checkpoints.save(out, checkpoints.MODEL, {
        "classes": list(FINDINGS), "size": config.size, "normalisation": dict(NORMALISATION), "half": half,
        "classifier": {"arch": config.arch, "cam_stride": config.cam_stride, "state": cast(model.state_dict())},
        "aligner": aligner, "written_by": {"dmfast": __version__, "torch": str(torch.__version__)}})


def load_model(path, device=None) -> Model:
    """A portable model file (``dmfast export``, or a run's ``model.pt``) ready for inference."""
    payload = checkpoints.load(path, checkpoints.MODEL)
    if payload["classes"] != list(FINDINGS) or payload["normalisation"] != NORMALISATION:
        raise ValueError(f"{path}: a model of classes {payload['classes']} with input normalisation "
                         f"{payload['normalisation']}; this dmfast works with {list(FINDINGS)} and {NORMALISATION}")
    device = torch.device(device) if device else ops.default_device()
    full = lambda state: {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # noqa: E731
    spec = payload["classifier"]
    model = CAMClassifier(spec["arch"], len(FINDINGS), cam_stride=spec["cam_stride"])
    state = full(spec["state"])
    model.set_masks(state.get("masks"))
    model.load_state_dict(state)
    aligner = None
    if payload["aligner"] is not None:
        aligner = AlignmentNet(payload["aligner"]["input_size"])
        aligner.load_state_dict(full(payload["aligner"]["state"]))
        aligner = aligner.to(device).eval()
    return Model(model.to(device).eval(), aligner, payload["size"], device)


def to_image_frame(maps: torch.Tensor, theta: torch.Tensor | None, resolution: int) -> torch.Tensor:
    """Maps ``[N, h, w]`` upsampled to ``resolution`` and, for maps of aligned images (``theta [N, 2, 3]``, aligned
    -> image frame), warped back onto the original image, so boxes drawn from them land on the X-ray itself.
    Outside the aligned field of view the map takes its own minimum (it says nothing there)."""
    up = F.interpolate(maps[:, None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
    if theta is None:
        return up[:, 0]
    low = up.amin((2, 3), keepdim=True)
    inverse = ops.affine_inverse(theta).to(up.dtype)
    return (ops.affine_smooth((up - low).contiguous(), inverse, 1) + low)[:, 0]
