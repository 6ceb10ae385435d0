"""Trained models at inference: loading a classifier or an alignment module from its checkpoint, running a
classifier on uint8 image batches (probabilities and class activation maps, on aligned images when it was trained
on them), and the portable model file (:func:`export_model`, :func:`load_model`). Shared by ``dmfast train``
(validation, model.pt), ``align`` (perceptual loss), ``masks``, ``eval`` and ``export``."""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, checkpoints, ops
from .config import TrainConfig, box_levels, from_dict
from .config import min_probability as probability_floor
from .data.dataset import FINDINGS
from .data.images import NORMALISATION, Square, load_gray, to_model_input, to_square
from .data.splits import Splits
from .io import check_outputs
from .models import AlignmentNet, CAMClassifier


def load_classifier(path, device="cpu") -> tuple:
    """A trained classifier from a ``dmfast train`` checkpoint, in eval mode with its disease masks (if it was
    trained with some): ``(model, config, state)``."""
    state = checkpoints.load(path, checkpoints.CLASSIFIER)
    try:
        config = from_dict(TrainConfig, state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its settings cannot be used ({error})") from None
    diverged = checkpoints.non_finite(state["model"])
    if diverged:
        raise ValueError(f"{path}: its weights hold NaN or infinite values ({', '.join(diverged[:3])}): the run "
                         "diverged (a lower --lr, or an earlier epoch's best.pt)")
    model = CAMClassifier(config.arch, len(FINDINGS), cam_stride=config.cam_stride)
    with weights_of(path, config.arch):
        model.set_masks(state["model"].get("masks"))
        model.load_state_dict(state["model"])
    return model.to(device).eval(), config, state


@contextmanager
def weights_of(path, what: str):
    """A block that loads the weights of file ``path`` into a ``what``: a mismatch is an error naming the file and
    the first tensor that does not fit, not torch's traceback."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"{path}: its weights do not fit a {what} ({detail[:300]})") from None


def load_aligner(path, device="cpu") -> AlignmentNet:
    """A trained alignment module from a ``dmfast align`` checkpoint, in eval mode."""
    state = checkpoints.load(path, checkpoints.ALIGNMENT)
    with weights_of(path, "alignment network"):
        net = AlignmentNet(**state["net_config"])
        net.load_state_dict(state["model"])
    return net.to(device).eval()


def map_resolution(size: int) -> int:
    """Side of the CAMs warped back onto a ``size``-px input, from which boxes are drawn: a quarter of the image."""
    return max(size // 4, 8)


@dataclass
class Prediction:
    probabilities: torch.Tensor  # [B, C]
    cams: torch.Tensor  # [B, C, h, w], in the frame the model saw (aligned when it was trained aligned)
    theta: torch.Tensor | None  # [B, 2, 3] alignment transforms (aligned frame -> image frame), or None

    def boxes(self, images: list, classes: list, size: int, thresholds, max_boxes: int, names: list) -> tuple:
        """Boxes of the CAM of class ``classes[i]`` on image ``images[i]``, in the pixels of the ``size``-px input
        (maps of aligned images warped back onto it, at :func:`map_resolution`): ``(maps, boxes, scores,
        counts)`` as ``ops.cam_boxes``, on the CPU. A CAM with NaN or inf is an error naming ``names[i]`` and the
        class."""
        b_index, c_index = torch.tensor(images, device=self.cams.device), torch.tensor(classes, device=self.cams.device)
        theta = self.theta[b_index] if self.theta is not None else None
        maps = to_image_frame(self.cams[b_index, c_index], theta, map_resolution(size))
        boxes, scores, counts = (t.cpu() for t in ops.cam_boxes(maps, (size, size), thresholds, max_boxes))
        if (counts < 0).any():
            i = int(torch.nonzero(counts < 0)[0, 0])
            raise ValueError(f"{names[i]}: the {FINDINGS[classes[i]]} CAM contains NaN or infinite values (a "
                             "diverged model?)")
        return maps, boxes, scores, counts


class Model:
    """A trained classifier (and its alignment module, for an aligned model) at inference:
    ``model(pixels)`` -> :class:`Prediction` for uint8 images ``[B, 1, size, size]``, and :meth:`predict` for
    X-ray files or arrays of any size."""

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

    def square(self, image) -> "Square":
        """An image file or a 2-D uint8 array/tensor padded to a centred square at the model's input size (safe to
        run in threads, ahead of :meth:`predict_squares`)."""
        return to_square(_gray(image), self.size)

    def predict(self, images, min_probability: float = 0.5, box_thresholds=(0.5,), max_boxes: int = 1,
                batch: int = 16, names: list | None = None) -> list:
        """Probabilities, CAMs and boxes for X-rays of any size: ``images`` are image files (PNG, JPEG, DICOM) or
        2-D uint8 arrays/tensors ``[H, W]`` (a list, a ``[B, H, W]`` tensor, or one). Each is padded to a centred
        square (never squashed) and resized to the model's input; CAMs of aligned models are warped back onto the
        image. The boxes of every class whose probability reaches ``min_probability`` come back in the image's own
        pixels. ``names`` label the images in errors (default: their paths or positions). Returns one
        :class:`ImagePrediction` per image."""
        if isinstance(images, (str, Path)) or getattr(images, "ndim", None) == 2:
            images = [images]  # one X-ray: a list of one result
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        names = names or [str(image) if isinstance(image, (str, Path)) else f"image {i}"
                          for i, image in enumerate(images)]
        results = []
        for start in range(0, len(images), batch):
            squares = [self.square(image) for image in images[start:start + batch]]
            results += self.predict_squares(squares, min_probability, box_thresholds, max_boxes,
                                            names[start:start + batch])
        return results

    def predict_squares(self, squares: list, min_probability: float = 0.5, box_thresholds=(0.5,),
                        max_boxes: int = 1, names: list | None = None) -> list:
        """:meth:`predict` for one batch of :class:`Square` images."""
        box_thresholds, min_probability = box_levels(box_thresholds, max_boxes), probability_floor(min_probability)
        names = names or [f"image {i}" for i in range(len(squares))]
        prediction = self(torch.from_numpy(np.stack([square.pixels for square in squares]))[:, None])
        rows = torch.nonzero(prediction.probabilities >= min_probability).tolist()
        if rows:  # boxes of the reported classes only: warping back all 14 maps of every image costs
            _, boxes, scores, counts = prediction.boxes([b for b, _ in rows], [c for _, c in rows], self.size,
                                                        box_thresholds, max_boxes, [names[b] for b, _ in rows])
        probabilities, cams = prediction.probabilities.cpu(), prediction.cams.cpu()
        theta = prediction.theta.cpu() if prediction.theta is not None else None
        results = []
        for b, square in enumerate(squares):
            offset = torch.tensor([square.pad_x, square.pad_y] * 2, dtype=torch.float64)
            limit = torch.tensor([square.width, square.height] * 2, dtype=torch.float64)
            found = {}
            for i in (i for i, row in enumerate(rows) if row[0] == b):
                kept = (boxes[i, :min(int(counts[i]), max_boxes)].double() * square.scale - offset)
                kept = kept.clamp(min=0).minimum(limit)
                inside = (kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1])  # not wholly in the padding
                found[FINDINGS[rows[i][1]]] = [box + [score] for box, score in
                                               zip(kept[inside].tolist(), scores[i, :len(kept)][inside].tolist())]
            results.append(ImagePrediction(square.width, square.height, dict(zip(FINDINGS, probabilities[b].tolist())),
                                           found, cams[b], None if theta is None else theta[b], self.size,
                                           (square.side, square.pad_x, square.pad_y)))
        return results


@dataclass
class ImagePrediction:
    """One X-ray's result from :meth:`Model.predict`: probabilities, and boxes in the image's own pixels; its CAMs
    on the image through :meth:`image_cams` and :meth:`heatmap`."""

    width: int
    height: int
    probabilities: dict  # class -> probability
    boxes: dict  # class -> [[x0, y0, x1, y1, score], ...] in the image's pixels, best first (reported classes)
    cams: torch.Tensor  # [C, h, w] as the model computed them (in the aligned frame for an aligned model)
    theta: torch.Tensor | None  # [2, 3] the alignment (aligned frame -> model input), or None
    size: int  # the model's input size
    frame: tuple  # (side, pad_x, pad_y): the centred square of side `side` padding the image

    def image_cams(self, classes: list | None = None) -> torch.Tensor:
        """The CAMs of ``classes`` (default: all) over the padded square, ``[len(classes), r, r]`` (r a quarter of
        the model's input): map pixel (u, v) covers image point ((u + 0.5) * side / r - pad_x, ...)."""
        index = list(range(len(FINDINGS))) if classes is None else [FINDINGS.index(c) for c in classes]
        theta = None if self.theta is None else self.theta.expand(len(index), 2, 3)
        return to_image_frame(self.cams[index], theta, map_resolution(self.size))

    def heatmap(self, finding: str, scale: float = 1.0) -> torch.Tensor:
        """The CAM of ``finding`` over the image itself (the padding cropped), ``[H, W]`` scaled by ``scale``."""
        side, pad_x, pad_y = self.frame
        full = F.interpolate(self.image_cams([finding])[None].float(), size=(round(side * scale),) * 2,
                             mode="bilinear", align_corners=False)[0, 0]
        x0, y0 = round(pad_x * scale), round(pad_y * scale)
        return full[y0:y0 + max(round(self.height * scale), 1), x0:x0 + max(round(self.width * scale), 1)]


def _gray(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_gray(image)
    array = image.cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.ndim != 2 or array.dtype != np.uint8 or 0 in array.shape:
        raise ValueError(f"predict: an image array must be 2-D uint8 [H, W], got {array.dtype} {array.shape}")
    return array


class Classifier(Model):
    """``Classifier(checkpoint)(pixels)`` for a ``dmfast train`` checkpoint, with its config and splits."""

    def __init__(self, checkpoint, device=None):
        self.path = Path(checkpoint)
        device = ops.chosen_device(device)
        model, self.config, state = load_classifier(checkpoint, device)
        self.splits = Splits(**state["splits"])
        aligner = None
        if self.config.aligned:
            if not Path(self.config.aligned).is_file():
                raise FileNotFoundError(f"{checkpoint} was trained on aligned images, but its alignment checkpoint "
                                        f"{self.config.aligned} is missing (export a model file to move a model)")
            aligner = load_aligner(self.config.aligned, device)
        super().__init__(model, aligner, self.config.size, device)


def export_model(source, out, half: bool = False, overwrite: bool = False) -> Path:
    """Write the portable model file (format in :mod:`dmfast.checkpoints`) of a ``dmfast train`` checkpoint or run
    folder to ``out``: weights only, the alignment network and anchor embedded; ``half`` stores float16. An
    existing ``out`` is replaced only with ``overwrite``."""
    source = Path(source) / "checkpoint.pt" if Path(source).is_dir() else Path(source)
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: a folder; give the model file's path (e.g. {out / 'model.pt'})")
    if out.resolve() == source.resolve() or (out.name in ("checkpoint.pt", "best.pt") and out.exists()):
        raise ValueError(f"--out {out}: that is a training checkpoint (never replaced by a model file); give another "
                         "path, e.g. RUN/model.pt")
    check_outputs(out.parent, [out.name], "dmfast export", overwrite)
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
    """A trained model ready for inference, from a portable model file (``dmfast export``, or ``RUN/model.pt``
    of a ``dmfast train`` run; a run folder stands for its ``model.pt``). Model files hold weights only and are
    read with ``weights_only=True``; a training checkpoint (a full pickle) is refused with the way to export it."""
    device = ops.chosen_device(device)
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise FileNotFoundError(f"{path}: a folder without model.pt (a dmfast train run writes it at its end; "
                                    f"`dmfast export {path} --out model.pt` makes it for an older run)")
        path = path / "model.pt"
    payload = checkpoints.load(path, checkpoints.MODEL)
    if payload["classes"] != list(FINDINGS) or payload["normalisation"] != NORMALISATION:
        raise ValueError(f"{path}: a model of classes {payload['classes']} with input normalisation "
                         f"{payload['normalisation']}; this dmfast works with {list(FINDINGS)} and {NORMALISATION}")
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
