"""Trained models at inference: loading a classifier from any of its files (:func:`read_trained`: model file, run
folder, checkpoint) or an alignment module from its checkpoint, running a classifier on uint8 image batches
(probabilities and class activation maps, on aligned images when it was trained on them), and the portable model
file (:func:`export_model`, :func:`load_model`). Shared by ``dmfast train`` (validation, model.pt), ``align``
(perceptual loss), ``masks``, ``eval`` and ``export``."""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints, ops
from .cam_methods import class_maps
from .config import BOX_SCORES, CAM_METHODS, MAX_BOXES, PRECISIONS, TrainConfig, box_levels, from_dict
from .config import min_probability as probability_floor
from .data.cache import ImageCache, default_cache_dir
from .data.dataset import FINDINGS, finding_index
from .data.formats import open_dataset
from .data.images import NORMALISATION, Square, gray_of, load_gray, to_model_input, to_square
from .data.splits import Splits
from .errors import DataError, ImageError, ModelFileError, SettingsError
from .io import check_outputs, versions, writing
from .models import AlignmentNet, CAMClassifier, autocast_dtype, compiled, convolutions_stored_in, resolve_precision


RUN_FILES = ("model.pt", "checkpoint.pt")  # what a run folder stands for, the first there


def trained_file(path) -> Path:
    """The file of the trained classifier ``path`` names: the file itself, or for a ``dmfast train`` run folder its
    ``model.pt``, else (a run still training, or of an older dmfast) its ``checkpoint.pt``."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = next((path / name for name in RUN_FILES if (path / name).is_file()), None)
    if found is None:
        raise ModelFileError(f"{path}: a folder without model.pt or checkpoint.pt (not a dmfast train run "
                             "folder; a run writes checkpoint.pt every epoch and model.pt at its end)")
    return found


def read_trained(path) -> tuple:
    """``(file, payload)`` of a trained classifier, whichever way it is given: a portable model file, a run folder
    (see :func:`trained_file`), or a ``dmfast train`` checkpoint (``checkpoint.pt``, ``best.pt``); each read
    weights only. ``payload["format"]`` says which: :data:`checkpoints.MODEL` or :data:`checkpoints.CLASSIFIER`."""
    path = trained_file(path)
    return path, checkpoints.load(path, (checkpoints.MODEL, checkpoints.CLASSIFIER))


def _float(state: dict) -> dict:
    """A state dict with float16 weights (a ``--half`` model file) back in float32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_classifier(path, device="cpu") -> tuple:
    """A trained classifier (any path :func:`read_trained` takes), in eval mode with its disease masks (if it was
    trained with some): ``(model, config, payload)``. ``config`` is its run's TrainConfig; of a model file written
    before model files kept it, only ``size``, ``arch`` and ``cam_stride`` are known and ``data`` is None."""
    path, payload = read_trained(path)
    if payload["format"] == checkpoints.MODEL:
        if payload["classes"] != list(FINDINGS) or payload["normalisation"] != NORMALISATION:
            raise ModelFileError(f"{path}: a model of classes {payload['classes']} with input normalisation "
                                 f"{payload['normalisation']}; this dmfast works with {list(FINDINGS)} and "
                                 f"{NORMALISATION}")
        spec = payload["classifier"]
        settings = {**(payload.get("config") or {"data": None, "out": None}), "size": payload["size"],
                    "arch": spec["arch"], "cam_stride": spec["cam_stride"]}
        state = _float(spec["state"])
    else:
        settings, state = payload["config"], payload["model"]
    try:
        config = from_dict(TrainConfig, settings)
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its settings cannot be used ({error})") from None
    model = CAMClassifier(config.arch, len(FINDINGS), cam_stride=config.cam_stride)
    with weights_of(path, config.arch):
        model.set_masks(state.get("masks"))
        model.load_state_dict(state)
    return model.to(device).eval(), config, payload


@contextmanager
def weights_of(path, what: str):
    """A block that loads the weights of file ``path`` into a ``what``: a mismatch is an error naming the file and
    the first tensor that does not fit, not torch's traceback."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ModelFileError(f"{path}: its weights do not fit a {what} ({detail[:300]})") from None


def load_aligner(path, device="cpu") -> AlignmentNet:
    """A trained alignment module from a ``dmfast align`` checkpoint, in eval mode."""
    state = checkpoints.load(path, checkpoints.ALIGNMENT)
    with weights_of(path, "alignment network"):
        net = AlignmentNet(**state["net_config"])
        net.load_state_dict(state["model"])
    return net.to(device).eval()


def model_input(pixels: torch.Tensor, aligner: AlignmentNet | None = None) -> torch.Tensor:
    """A uint8 batch as the classifier sees it, on the pixels' device: normalised there (put uint8 on the device
    first: a quarter of the bytes travel) and, for an aligned model, aligned."""
    images = to_model_input(pixels)
    if aligner is None:
        return images
    with torch.no_grad():
        return aligner.align(images)


def map_resolution(size: int) -> int:
    """Side of the CAMs warped back onto a ``size``-px input, from which boxes are drawn: a quarter of the image."""
    return max(size // 4, 8)


@dataclass
class Prediction:
    """A batch's result of :meth:`Model.__call__`."""

    probabilities: torch.Tensor  # [B, C]
    cams: torch.Tensor  # [B, C, h, w], in the frame the model saw (aligned when it was trained aligned)
    theta: torch.Tensor | None  # [B, 2, 3] alignment transforms (aligned frame -> image frame), or None
    # [B] how far each input's features are from the training X-rays' (:meth:`Model.ood_score`); None for a
    # model without the statistics
    ood: torch.Tensor | None = None

    def boxes(self, images: list, classes: list, size: int, thresholds, max_boxes: int, names: list,
              score: str = BOX_SCORES[0]) -> tuple:
        """Boxes of the CAM of class ``classes[i]`` on image ``images[i]``, in the pixels of the ``size``-px input
        (maps of aligned images warped back onto it, at :func:`map_resolution`): ``(maps, boxes, scores,
        counts)`` as ``ops.cam_boxes``, on the CPU. A CAM with NaN or inf is an error naming ``names[i]`` and the
        class.

        A box's score ranks detections across images and classes: the class probability ``p`` times the mean
        (``score="mean"``) or the peak (``"peak"``) of the min-max normalised CAM inside the box's region, or ``p``
        alone (``"probability"``). The normalised CAM alone is 1 at every map's peak, so it cannot rank boxes of
        different maps; ``p`` carries the image-level evidence and the region term orders the boxes of one map
        (with ``"mean"``, nested boxes of several thresholds score apart: the inner region's mean is higher)."""
        b_index, c_index = torch.tensor(images, device=self.cams.device), torch.tensor(classes, device=self.cams.device)
        theta = self.theta[b_index] if self.theta is not None else None
        maps = to_image_frame(self.cams[b_index, c_index], theta, map_resolution(size))
        boxes, region, counts = scored_boxes(maps, size, thresholds, max_boxes, score)
        if (counts < 0).any():
            i = int(torch.nonzero(counts < 0)[0, 0])
            raise ModelFileError(f"{names[i]}: the {FINDINGS[classes[i]]} CAM contains NaN or infinite values (a "
                                 "diverged model?)")
        probability = self.probabilities[b_index, c_index].double().cpu()[:, None]
        return maps, boxes, probability * region, counts


def scored_boxes(maps: torch.Tensor, size: int, thresholds, max_boxes: int, score: str = BOX_SCORES[0]) -> tuple:
    """``ops.cam_boxes`` of ``maps [N, h, w]`` at ``size`` px, on the CPU: ``(boxes, region, counts)``. The boxes
    are always those the paper's metric keeps (the ``max_boxes`` best by the region's peak), whatever ``score``
    says; ``region`` is the box's region term of ``score``: the region's mean (``"mean"``, from a second pass over
    every region), its peak (``"peak"``) or 1 (``"probability"``); 0 past the count."""
    if score not in BOX_SCORES:
        raise SettingsError(f"box score must be one of {', '.join(BOX_SCORES)}, got {score!r}")
    boxes, peak, counts = (t.cpu() for t in ops.cam_boxes(maps, (size, size), thresholds, max_boxes, "max"))
    shown = torch.arange(boxes.shape[-2])[None] < counts[:, None]
    if score == "peak":
        return boxes, peak, counts
    if score == "probability" or not shown.any():
        return boxes, shown.double(), counts
    every = int(min(counts.max(), MAX_BOXES))
    all_boxes, means, _ = (t.cpu() for t in ops.cam_boxes(maps, (size, size), thresholds, every, "mean"))
    # The k-th copy of a box among the kept ones is the k-th copy among all (boxes of two levels can coincide).
    kept_copy, all_copy = _copy_rank(boxes, shown), _copy_rank(all_boxes, torch.arange(every)[None] < counts[:, None])
    same = ((boxes[:, :, None] == all_boxes[:, None]).all(-1) & (kept_copy[:, :, None] == all_copy[:, None])
            & (all_copy[:, None] >= 0))
    region = torch.where(same, means[:, None], 0.0).sum(-1)  # one match per kept box
    return boxes, region * shown, counts


def _copy_rank(boxes: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
    """For each shown box of ``boxes [N, K, 4]``, how many shown boxes before it have the same corners; -1 past
    the count."""
    same = (boxes[:, :, None] == boxes[:, None]).all(-1) & shown[:, None] & shown[:, :, None]
    before = torch.ones(boxes.shape[1], boxes.shape[1], dtype=torch.bool).tril(-1)
    return torch.where(shown, (same & before).sum(-1), -1)


class Model:
    """A trained classifier (and its alignment module, for an aligned model) at inference:
    ``model(pixels)`` -> :class:`Prediction` for uint8 images ``[B, 1, size, size]``, and :meth:`predict` for
    X-ray files or arrays of any size."""

    def __init__(self, model: CAMClassifier, aligner: AlignmentNet | None, size: int, device,
                 precision: str = PRECISIONS[0], compile: bool = False):
        self.model, self.aligner, self.size, self.device = model, aligner, size, torch.device(device)
        self.precision = resolve_precision(precision, self.device)  # "auto" resolved: what runs
        self.low_precision = autocast_dtype(self.precision, self.device)
        if self.low_precision is not None:  # the layout the low-precision convolution kernels are fastest in
            for network in (self.model, aligner) if aligner is not None else (self.model,):
                convolutions_stored_in(network.to(memory_format=torch.channels_last), self.low_precision)
        self.network = compiled(self.model) if compile else self.model  # compile: under torch.compile
        self.cam_method = CAM_METHODS[0]  # the maps of every call by default (:mod:`dmfast.cam_methods`)
        self.ood = None  # the training images' feature statistics (feature_statistics), from a model file

    @property
    def masks(self) -> torch.Tensor | None:
        """The disease masks ``[C, h, w]`` the classifier attends with, or None."""
        return self.model.masks

    @property
    def classes(self) -> tuple:
        """The findings, in the order of every probability vector and CAM (names: any case, or a release's
        spelling, where a finding is asked for by name)."""
        return FINDINGS

    def pixels_of(self, pixels) -> torch.Tensor:
        """``pixels`` as the uint8 ``[B, 1, size, size]`` batch the classifier takes: uint8 as it is; ``[B, size,
        size]`` given a channel; other dtypes (uint16 by their significant bits, floats in [0, 1]) converted by the
        readers' rule (:func:`~dmfast.data.images.gray_of`). Another size, or floats outside [0, 1], is an
        ImageError (a ValueError) saying what is expected."""
        tensor = pixels if torch.is_tensor(pixels) else torch.from_numpy(np.ascontiguousarray(pixels))
        if tensor.dim() == 3:
            tensor = tensor[:, None]
        if tensor.dim() != 4 or tensor.shape[1] != 1 or tuple(tensor.shape[2:]) != (self.size, self.size):
            raise ImageError(f"pixels of shape {tuple(tensor.shape)}; this model takes [B, 1, {self.size}, "
                             f"{self.size}] (uint8, or floats in [0, 1]); Model.predict pads and resizes X-rays of "
                             "any size")
        if tensor.dtype == torch.uint8:
            return tensor
        return torch.stack([torch.from_numpy(gray_of(image[0], f"pixels[{i}]")) for i, image in enumerate(tensor)])[
            :, None]

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, method: str | None = None) -> Prediction:
        """Probabilities and CAMs (float32) of uint8 ``pixels [B, 1, size, size]`` (others as :meth:`pixels_of`
        converts or refuses them); ``method``: the maps' kind
        (:mod:`dmfast.cam_methods`: the head's own, Grad-CAM, Grad-CAM++ or Eigen-CAM; the same probabilities),
        default :attr:`cam_method`.
        With ``precision`` bf16 or fp16 the classifier's backbone and the alignment network run under autocast in
        channels_last (the CAM head, the transform and the warp in float32, see :class:`CAMClassifier`): faster
        where the device has native low-precision arithmetic, with probabilities a few hundredths off float32's
        (docs/performance.md)."""
        images = to_model_input(self.pixels_of(pixels)).to(self.device)
        theta = None
        if self.aligner is not None:
            with torch.autocast(self.device.type, dtype=self.low_precision, enabled=self.low_precision is not None):
                theta = self.aligner.theta(images)  # float32 (AlignmentNet.parameters_of), warped in float32
            images = self.aligner.warp(images, theta)
        if self.low_precision is not None:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.low_precision, enabled=self.low_precision is not None):
            if (method or self.cam_method) == CAM_METHODS[0]:
                logits, cams, pooled = self.network(images, cams=True, pooled=True)
            else:  # the backbone as for the head's own maps; the maps from its last feature map
                features = self.model.stages(images)[-1]
                logits, cams = class_maps(self.model.head, features, method or self.cam_method)
                pooled = features.float().mean((2, 3))
        return Prediction(torch.sigmoid(logits).float(), cams.float(), theta, self.ood_score(pooled))

    def ood_score(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """``[B]``: the root mean square z-score of the pooled last feature map ``[B, K]`` against the training
        images' (their mean and standard deviation per channel, kept in the model file); beyond :attr:`ood`'s
        ``threshold`` (calibrated on the validation images) an input is unlike the X-rays the model was trained on.
        None for a model file without the statistics."""
        if self.ood is None:
            return None
        mean, std = (self.ood[k].to(pooled.device) for k in ("mean", "std"))
        return ((pooled.float() - mean) / std).square().mean(1).sqrt().cpu()

    def square(self, image, name: str = "image") -> "Square":
        """An image file or an image array (:meth:`predict`'s rule) padded to a centred square at the model's input
        size (safe to run in threads, ahead of :meth:`predict_squares`)."""
        return to_square(_gray(image, name), self.size)

    def predict(self, images, min_probability: float = 0.5, box_thresholds=(0.5,), max_boxes: int = 1,
                batch: int = 16, names: list | None = None, box_score: str = BOX_SCORES[0],
                box_floor: float | None = None) -> list:
        """Probabilities, CAMs and boxes for X-rays of any size: ``images`` are image files (PNG, JPEG, DICOM) or
        arrays/tensors ``[H, W]`` (a list, a ``[B, H, W]`` tensor, or one): uint8, uint16 and the like by their
        significant bits, floats in [0, 1], ``[H, W, 3]`` colour to grey, as the readers decode files
        (:func:`~dmfast.data.images.gray_of`; anything else is refused, saying what is expected). Each is padded to
        a centred square (never squashed) and resized to the model's input; CAMs of aligned models are warped back
        onto the image. The boxes of every class whose probability reaches ``min_probability`` (the reported
        findings) come back in the image's own pixels, scored as ``box_score`` says (:meth:`Prediction.boxes`);
        those of every class reaching ``box_floor`` (default: ``min_probability``; 0: all) in ``all_boxes``, for
        detection metrics. ``names`` label the images in errors (default: their paths or positions). Returns one
        :class:`ImagePrediction` per image."""
        if isinstance(images, (str, Path)) or getattr(images, "ndim", None) == 2 or \
                getattr(images, "ndim", None) == 3 and images.shape[-1] in (1, 3, 4):
            images = [images]  # one X-ray (grey, or colour [H, W, 3]): a list of one result
        if batch < 1:
            raise SettingsError(f"batch must be >= 1, got {batch}")
        names = names or [str(image) if isinstance(image, (str, Path)) else f"image {i}"
                          for i, image in enumerate(images)]
        results = []
        for start in range(0, len(images), batch):
            squares = [self.square(image, name) for image, name in zip(images[start:start + batch],
                                                                        names[start:start + batch])]
            results += self.predict_squares(squares, min_probability, box_thresholds, max_boxes,
                                            names[start:start + batch], box_score, box_floor)
        return results

    def predict_squares(self, squares: list, min_probability: float = 0.5, box_thresholds=(0.5,),
                        max_boxes: int = 1, names: list | None = None, box_score: str = BOX_SCORES[0],
                        box_floor: float | None = None) -> list:
        """:meth:`predict` for one batch of :class:`Square` images."""
        box_thresholds, min_probability = box_levels(box_thresholds, max_boxes), probability_floor(min_probability)
        box_floor = min_probability if box_floor is None else probability_floor(box_floor, "box_floor")
        names = names or [f"image {i}" for i in range(len(squares))]
        prediction = self(torch.from_numpy(np.stack([square.pixels for square in squares]))[:, None])
        # boxes of the classes asked for only: warping back all 14 maps of every image costs
        rows = torch.nonzero(prediction.probabilities >= min(min_probability, box_floor)).tolist()
        if rows:
            _, boxes, scores, counts = prediction.boxes([b for b, _ in rows], [c for _, c in rows], self.size,
                                                        box_thresholds, max_boxes, [names[b] for b, _ in rows],
                                                        box_score)
        probabilities, cams = prediction.probabilities.cpu(), prediction.cams.cpu()
        theta = prediction.theta.cpu() if prediction.theta is not None else None
        found = [{} for _ in squares]
        if rows:  # every box at once (per-box tensor work cost more than the network's bf16 pass)
            for (b, c), kept in zip(rows, _in_images(boxes.numpy(), scores.numpy(), counts.numpy(), max_boxes,
                                                     [squares[b] for b, _ in rows])):
                found[b][FINDINGS[c]] = kept
        results = []
        for b, square in enumerate(squares):
            p = dict(zip(FINDINGS, probabilities[b].tolist()))
            results.append(ImagePrediction(square.width, square.height, p,
                                           {c: v for c, v in found[b].items() if p[c] >= min_probability},
                                           cams[b], None if theta is None else theta[b], self.size,
                                           (square.side, square.pad_x, square.pad_y),
                                           {c: v for c, v in found[b].items() if p[c] >= box_floor},
                                           None if prediction.ood is None else float(prediction.ood[b]),
                                           None if self.ood is None else self.ood["threshold"]))
        return results


def _in_images(boxes: np.ndarray, scores: np.ndarray, counts: np.ndarray, max_boxes: int, squares: list) -> list:
    """Per map ``i``: its first ``min(counts[i], max_boxes)`` boxes (in the model input's pixels) in the pixels of
    the X-ray of ``squares[i]`` as ``[x0, y0, x1, y1, score]`` lists, clipped to the image, those wholly in the
    padding left out."""
    boxes, scores = boxes[:, :max_boxes].astype(np.float64), scores[:, :max_boxes]
    scale = np.array([s.scale for s in squares], np.float64)[:, None, None]
    offset = np.array([[s.pad_x, s.pad_y] * 2 for s in squares], np.float64)[:, None]
    limit = np.array([[s.width, s.height] * 2 for s in squares], np.float64)[:, None]
    kept = np.minimum(np.maximum(boxes * scale - offset, 0.0), limit)
    keep = (np.arange(kept.shape[1])[None] < np.minimum(counts, max_boxes)[:, None]) \
        & (kept[..., 2] > kept[..., 0]) & (kept[..., 3] > kept[..., 1])  # shown, and not wholly in the padding
    rows = np.concatenate([kept, scores[..., None].astype(np.float64)], -1).tolist()
    return [[box for box, k in zip(map_rows, map_keep) if k] for map_rows, map_keep in zip(rows, keep.tolist())]


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
    all_boxes: dict = field(default_factory=dict)  # as boxes, for every class reaching the box floor
    ood_score: float | None = None  # how far from the training X-rays (Model.ood_score); None: not known
    ood_threshold: float | None = None  # the score beyond which an input is out of distribution

    @property
    def out_of_distribution(self) -> bool | None:
        """Whether the input is unlike the X-rays the model was trained on (its score beyond the threshold
        calibrated on the validation images); None when the model file has no statistics."""
        return None if self.ood_score is None or self.ood_threshold is None else self.ood_score > self.ood_threshold

    def image_cams(self, classes: list | None = None, outside: float | None = None) -> torch.Tensor:
        """The CAMs of ``classes`` (default: all) over the padded square, ``[len(classes), r, r]`` (r a quarter of
        the model's input): map pixel (u, v) covers image point ((u + 0.5) * side / r - pad_x, ...). For an aligned
        model the area outside its field of view holds the map's minimum, or ``outside`` (NaN: no data)."""
        index = list(range(len(FINDINGS))) if classes is None else [finding_index(c) for c in classes]
        theta = None if self.theta is None else self.theta.expand(len(index), 2, 3)
        return to_image_frame(self.cams[index], theta, map_resolution(self.size), outside)

    def heatmap(self, finding: str, scale: float = 1.0) -> torch.Tensor:
        """The CAM of ``finding`` over the image itself (the padding cropped), ``[H, W]`` scaled by ``scale``."""
        return self.heatmaps([finding], scale)[0]

    def heatmaps(self, findings: list, scale: float = 1.0, outside: float | None = None) -> torch.Tensor:
        """:meth:`heatmap` of each of ``findings`` at once, ``[len(findings), H, W]`` (one resampling for all);
        ``outside``: see :meth:`image_cams`."""
        side, pad_x, pad_y = self.frame
        full = F.interpolate(self.image_cams(list(findings), outside)[None].float(), size=(round(side * scale),) * 2,
                             mode="bilinear", align_corners=False)[0]
        x0, y0 = round(pad_x * scale), round(pad_y * scale)
        return full[:, y0:y0 + max(round(self.height * scale), 1), x0:x0 + max(round(self.width * scale), 1)]


def _gray(image, name: str = "image") -> np.ndarray:
    """An image file decoded, or an image array converted by the readers' rule (:func:`gray_of`)."""
    return load_gray(image) if isinstance(image, (str, Path)) else gray_of(image, name)


class Classifier(Model):
    """``Classifier(path)(pixels)`` for a trained classifier given any way :func:`read_trained` takes (model file,
    run folder, ``checkpoint.pt``, ``best.pt``), with what eval and masks use: ``path`` (the file read),
    ``config`` (its run's settings, see :func:`load_classifier`), ``splits`` (empty, with ``splits_known`` False,
    for a model file written before model files kept them), ``patients`` (a model file's patient IDs of the
    training and validation images, else None: eval reads them from the training data) and ``anchor`` (the
    alignment run's anchor ``[S, S]``, or None) with ``anchor_source``."""

    def __init__(self, checkpoint, device=None, precision: str = PRECISIONS[0], compile: bool = False):
        self.path = trained_file(checkpoint)
        device = ops.chosen_device(device)
        model, self.config, payload = load_classifier(self.path, device)
        stored = payload.get("splits")
        self.splits_known = stored is not None
        self.splits = Splits(**stored) if stored is not None else \
            Splits([], [], [], self.config.seed, self.config.val_fraction)
        self.patients = payload.get("patients") if payload["format"] == checkpoints.MODEL else None
        self.anchor, self.anchor_source, aligner = None, None, None
        statistics = payload.get("ood") if payload["format"] == checkpoints.MODEL else None
        if payload["format"] == checkpoints.MODEL:
            embedded = payload["aligner"]
            if embedded is not None:
                with weights_of(self.path, "alignment network"):
                    aligner = AlignmentNet(embedded["input_size"], embedded.get("arch", "resnet18"))
                    aligner.load_state_dict(_float(embedded["state"]))
                aligner = aligner.to(device).eval()
                if embedded.get("anchor") is not None:
                    self.anchor, self.anchor_source = embedded["anchor"].float(), f"embedded in {self.path}"
        elif self.config.aligned:
            if not Path(self.config.aligned).is_file():
                raise ModelFileError(f"{self.path} was trained on aligned images, but its alignment checkpoint "
                                     f"{self.config.aligned} is missing (export a model file to move a model)")
            aligner = load_aligner(self.config.aligned, device)
            anchor = Path(self.config.aligned).parent / "anchor.pt"
            if anchor.is_file():
                self.anchor, self.anchor_source = checkpoints.load_anchor(anchor), str(anchor)
        super().__init__(model, aligner, self.config.size, device, precision, compile)
        self.ood = statistics


def training_patients(config: TrainConfig, splits: Splits, dataset=None) -> tuple:
    """``(patients, format)``: the patient IDs (as str, sorted) of the training and validation images of
    ``splits`` in the run's training data (``dataset``, else ``config.data`` read again) and the data's format, or
    ``(None, None)`` when that data is not readable here."""
    if dataset is None:
        try:
            dataset = open_dataset(config.data, config.format, skip_problems=True, lists=False)
        except (DataError, OSError, TypeError, ValueError):  # moved, deleted, or never known (data None)
            return None, None
    trained = set(splits.train) | set(splits.val)
    return sorted({str(r.patient) for r in dataset.records if r.image in trained}), dataset.format


def export_model(source, out, half: bool = False, overwrite: bool = False, dataset=None, warn=print) -> Path:
    """Write the portable model file (format in :mod:`dmfast.checkpoints`) of a trained classifier (any path
    :func:`read_trained` takes; a model file is written again, e.g. as float16) to ``out``: weights only, the
    alignment network and anchor embedded; ``half`` stores float16. With them go its run's settings, splits and
    the patient IDs of its training and validation images, read from the training data (``dataset``: that data,
    already open) or kept from a model file, so that eval can check test images against the training images
    wherever the file goes (``warn`` says so when they cannot be read). An existing ``out`` is replaced only with
    ``overwrite``; a run folder's own model.pt as ``out`` is written from its checkpoint.pt."""
    given, source, out = Path(source), trained_file(source), Path(out)
    if given.is_dir() and source.resolve() == out.resolve() and (given / "checkpoint.pt").is_file():
        source = given / "checkpoint.pt"  # the run's model file written again, from its checkpoint
    if out.is_dir():
        raise SettingsError(f"--out {out}: a folder; give the model file's path (e.g. {out / 'model.pt'})")
    if out.name in ("checkpoint.pt", "best.pt") and (out.exists() or out.resolve() == source.resolve()):
        raise SettingsError(f"--out {out}: that is a training checkpoint (never replaced by a model file); give "
                            "another path, e.g. RUN/model.pt")
    if out.resolve() == source.resolve():
        again = source.parent / "checkpoint.pt"
        again_hint = f", or SOURCE {again} to write it again from the run's checkpoint" if again.is_file() else ""
        raise SettingsError(f"--out {out}: that is SOURCE itself ({source}); give another path{again_hint}")
    with writing(out.parent, "dmfast export"):
        check_outputs(out.parent, [out.name], "dmfast export", overwrite)
        return _export(source, out, half, dataset, warn)


def _export(source: Path, out: Path, half: bool, dataset, warn) -> Path:
    classifier = Classifier(source, precision="fp32")  # the weights as stored (no channels_last)
    config = classifier.config
    cache = config.cache or (default_cache_dir(config.data, config.size) if config.data else None)
    statistics = classifier.ood or feature_statistics(classifier, cache, classifier.splits, config.batch)
    if statistics is None:
        warn(f"{source}: its image cache ({cache}) is not readable here, so the model file has no "
             "statistics of its training images: predict will not flag inputs unlike them")
    cast = (lambda state: {k: v.cpu().half() if v.is_floating_point() else v.cpu() for k, v in state.items()}) \
        if half else (lambda state: {k: v.cpu() for k, v in state.items()})
    aligner = None
    if classifier.aligner is not None:
        aligner = {"input_size": classifier.aligner.input_size, "arch": classifier.aligner.arch,
                   "state": cast(classifier.aligner.state_dict()),
                   "anchor": classifier.anchor}
    settings, splits, patients = None, None, classifier.patients
    if config.data is not None:  # known: a checkpoint, or a model file that kept them
        patients, found = (patients, config.format) if patients is not None else \
            training_patients(config, classifier.splits, dataset)
        settings = {**asdict(config), "format": config.format or found}
    if classifier.splits_known:
        splits = asdict(classifier.splits)
        if patients is None:
            warn(f"{source}: its training data ({config.data}) is not readable here, so the model file keeps its "
                 "training images' names but not their patients: eval will check test images by name only")
    return checkpoints.save(out, checkpoints.MODEL, {
        "classes": list(FINDINGS), "size": config.size, "normalisation": dict(NORMALISATION), "half": half,
        "classifier": {"arch": config.arch, "cam_stride": config.cam_stride,
                       "state": cast(classifier.model.state_dict())},
        "aligner": aligner, "written_by": versions(),
        "config": settings, "splits": splits, "patients": patients, "ood": statistics})


OOD_IMAGES = 256  # training images the feature statistics come from, and validation images that calibrate them
OOD_QUANTILE = 0.99  # of the validation images' scores: the threshold beyond which an input is flagged


def feature_statistics(classifier: "Classifier", cache_folder, splits: Splits, batch: int = 32) -> dict | None:
    """What :meth:`Model.ood_score` compares with: the mean and standard deviation per channel of the pooled last
    feature map over (up to :data:`OOD_IMAGES`, evenly spaced) training images of the run's image cache, and the
    :data:`OOD_QUANTILE` of the validation images' scores as the threshold (the training images' when there are
    no validation images), in batches of ``batch``. None when the cache is not readable here, or the device runs
    out of memory."""
    try:
        cache = ImageCache(cache_folder, check_sources=False)
    except (DataError, OSError, TypeError, ValueError):
        return None
    train = [n for n in splits.train if n in cache]
    held_out = [n for n in splits.val if n in cache]
    if len(train) < 2:
        return None

    def pooled(names: list) -> torch.Tensor:
        names = [names[i] for i in np.linspace(0, len(names) - 1, min(len(names), OOD_IMAGES)).round().astype(int)]
        model, features = classifier.model, []
        for start in range(0, len(names), batch):
            images = model_input(cache.batch(names[start:start + batch]).to(classifier.device), classifier.aligner)
            features.append(model(images, cams=True, pooled=True)[2].cpu())
        return torch.cat(features)

    try:  # a low-precision Model's convolutions hold bf16/fp16 weights: they run under its autocast
        with torch.no_grad(), torch.autocast(classifier.device.type, dtype=classifier.low_precision,
                                             enabled=classifier.low_precision is not None):
            seen = pooled(train)
            # channels (nearly) silent on the training images would turn any activation into a huge z-score
            mean, std = seen.mean(0), seen.std(0).clamp_min(float(seen.std(0).median()) * 1e-2 + 1e-6)
            scores = ((pooled(held_out or train) - mean) / std).square().mean(1).sqrt()
    except torch.OutOfMemoryError:
        return None
    return {"mean": mean, "std": std, "threshold": float(torch.quantile(scores.double(), OOD_QUANTILE)),
            "quantile": OOD_QUANTILE, "calibration": "validation" if held_out else "training",
            "images": [len(seen), len(scores)]}


def load_model(path, device=None, precision: str = PRECISIONS[0], compile: bool = False) -> Model:
    """A trained model ready for inference, given any way :func:`read_trained` takes: a portable model file
    (``dmfast export``, or ``RUN/model.pt`` of a ``dmfast train`` run), a run folder (its ``model.pt``, else its
    ``checkpoint.pt``), or a ``checkpoint.pt`` or ``best.pt`` (whose aligned model's alignment network is read from
    its alignment run); all read with ``weights_only=True``. ``precision``: see :meth:`Model.__call__`;
    ``compile``: run the classifier under ``torch.compile`` (its first batch of each shape compiles)."""
    return Classifier(path, device, precision, compile)


def to_image_frame(maps: torch.Tensor, theta: torch.Tensor | None, resolution: int,
                   outside: float | None = None) -> torch.Tensor:
    """Maps ``[N, h, w]`` upsampled to ``resolution`` and, for maps of aligned images (``theta [N, 2, 3]``, aligned
    -> image frame), warped back onto the original image, so boxes drawn from them land on the X-ray itself.
    Outside the aligned field of view the map says nothing: it takes its own minimum there (for boxes), or
    ``outside`` when given (NaN: no data, for pictures)."""
    up = F.interpolate(maps[:, None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
    if theta is None:
        return up[:, 0]
    low = up.amin((2, 3), keepdim=True)
    inverse = ops.affine_inverse(theta).to(up.dtype)
    warped = (ops.affine_smooth((up - low).contiguous(), inverse, 1) + low)[:, 0]
    if outside is None:
        return warped
    seen = ops.affine_smooth(torch.ones_like(up), inverse, 1)[:, 0]  # 1 inside the aligned view, 0 beyond
    return torch.where(seen >= 0.5, warped, outside)
