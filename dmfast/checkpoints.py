"""Every file format dmfast writes and reads back: the classifier checkpoint (``dmfast train``: ``model``,
``config``, ``splits``, ``epoch`` and the optimiser, scheduler and random states to resume), the alignment
checkpoint (``dmfast align``: ``model``, ``net_config``, ``config``, ``history``) and its anchor image, and the masks
file (``dmfast masks``: ``masks [14, MASK_SIZE, MASK_SIZE]`` in {0, 1}, ``average``, ``has_mask``, ``kind``), and
the portable model file (``dmfast export``, and ``model.pt`` of every ``dmfast train`` run): weights only, read with
``torch.load(weights_only=True)``, self-contained: ``classes``, ``size``, ``normalisation``, ``classifier`` (``arch``,
``cam_stride``, ``state`` with the disease masks when trained with them), ``aligner`` (``input_size``, ``state``,
``anchor``) or None, ``half`` and ``written_by`` (dmfast and torch versions); nothing is read from a path. For
``dmfast eval``'s check of test images against the training images wherever the file travels, it also keeps
(optional fields: files written before them read as None) its training run's settings ``config`` (the
TrainConfig as a dict, its paths a record only, ``format`` as detected), its ``splits`` (``train``, ``val``,
``test`` image names, ``seed``, ``val_fraction``, ``folds``) and ``patients``: the patient IDs (str) of its training
and validation images, None when the training data was not readable at export.

Each is a dict saved atomically with a ``format`` tag and a format ``version``; reading checks both and names the
file and the problem (missing, unreadable, another kind of file, written by a newer dmfast). Files of dmfast 0.1.0
carry no tag and read as version 1.
"""

import pickle
from pathlib import Path

import torch

from .config import ARCHS, CAM_STRIDES, MIN_CAM_CELLS, SIZE
from .data.dataset import FINDINGS
from .io import atomic_torch_save

VERSION = 1
MASK_SIZE = 64  # side of the stored masks; the classifier resizes them to its feature map
# format tag -> (what it is called in messages, keys it must have)
CLASSIFIER, ALIGNMENT, MASKS, MODEL = "dmfast.classifier", "dmfast.alignment", "dmfast.masks", "dmfast.model"
KINDS = {CLASSIFIER: ("classifier checkpoint", ("model", "config")),
         ALIGNMENT: ("alignment checkpoint", ("model", "net_config")), MASKS: ("masks file", ("masks",)),
         MODEL: ("model file", ("classes", "size", "normalisation", "classifier", "aligner"))}


def save(path, kind: str, payload: dict) -> Path:
    """Write ``payload`` as a file of format ``kind`` (one of :data:`KINDS`), atomically."""
    return atomic_torch_save(path, {"format": kind, "version": VERSION, **payload})


def load(path, kind) -> dict:
    """Read a file of format ``kind``, checked; a masks file's ``masks`` must also be ``[14, h, w]`` and finite.
    ``kind`` may be a tuple of formats, the file being any of them; ``payload["format"]`` then says which it is.
    Every format is read weights only (tensors and plain values; numpy arrays, as earlier checkpoints kept numpy's
    random state): a file that would run code when unpickled is refused, whatever it is called."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    what = " or ".join(KINDS[k][0] for k in kinds)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():  # not objects besides tensors: garbage
            raise ValueError(f"{path}: not a readable {what} (not a file torch.load reads: damaged, truncated or "
                             "another format)") from None
        raise ValueError(f"{path}: not {_a(what)}: it holds objects besides tensors and plain values, so it is not "
                         "read (dmfast reads its files weights only, never running code from them)") from None
    except Exception as error:  # a truncated or foreign file: say which and why, not a pickle traceback
        raise ValueError(f"{path}: not a readable {what} ({type(error).__name__}: {error})") from None
    found = (payload.get("format") or _untagged(payload, kinds)  # untagged: by its keys
             if isinstance(payload, dict) else None)
    if found not in (*kinds, None):
        raise ValueError(f"{path}: {_a(KINDS[found][0] if found in KINDS else f'{found} file')}, not {_a(what)}")
    kind = found or kinds[0]
    what, required = KINDS[kind] if found else (what, KINDS[kind][1])
    if found and payload.get("version", 1) > VERSION:
        raise ValueError(f"{path}: {what} of format version {payload['version']}, written by a newer dmfast; this "
                         f"one reads up to version {VERSION}")
    if not found or any(key not in payload for key in required):
        raise ValueError(f"{path}: not a dmfast {what} (expected a dict with {', '.join(map(repr, required))})")
    problem = _structure_problem(kind, payload)
    if problem:
        raise ValueError(f"{path}: not a usable {what}: {problem}")
    masks = payload.get("masks")
    if kind == MASKS and (not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != len(FINDINGS)):
        raise ValueError(f"{path}: not a dmfast masks file (expected a dict with 'masks' [{len(FINDINGS)}, h, w])")
    if kind == MASKS and (masks.shape[1] != masks.shape[2] or masks.shape[1] < MIN_CAM_CELLS):
        raise ValueError(f"{path}: masks of {masks.shape[1]} x {masks.shape[2]} per class; masks are square maps of "
                         f"at least {MIN_CAM_CELLS} x {MIN_CAM_CELLS} over the canonical chest (dmfast masks writes "
                         "them)")
    if kind == MASKS and not torch.isfinite(masks).all():
        raise ValueError(f"{path}: the masks contain NaN or infinite values")
    if kind == MASKS and masks.numel() and not (masks.min() >= 0 and masks.max() <= 1):
        raise ValueError(f"{path}: mask values must lie in [0, 1] (attention weights), found "
                         f"{masks.min().item():g} to {masks.max().item():g}")
    payload.setdefault("format", kind)  # files of dmfast 0.1.0 carry no tag
    return payload


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (earlier checkpoints kept numpy's random state as one)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _untagged(payload: dict, kinds: tuple) -> str:
    """The format of an untagged file (dmfast 0.1.0) among ``kinds``, by its keys."""
    if "net_config" in payload:
        return ALIGNMENT
    return next((k for k in kinds if all(key in payload for key in KINDS[k][1])), kinds[0])


def _structure_problem(kind: str, payload: dict) -> str | None:
    """What is wrong with the fields of a file of format ``kind`` (an edited or damaged file), or None."""
    def state(value) -> bool:
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())

    if kind in (CLASSIFIER, ALIGNMENT) and not state(payload["model"]):
        return "'model' is not a state dict of tensors"
    if kind == CLASSIFIER:
        config = payload["config"]
        if not isinstance(config, dict) or "arch" not in config or "size" not in config:
            return "its settings ('config') lack the architecture or the image size"
        if SIZE.problem(config["size"]):
            return f"size {SIZE.problem(config['size'])}"
        if config["arch"] not in ARCHS:
            return f"arch {config['arch']!r}"
    if kind == ALIGNMENT:
        net = payload["net_config"]
        if not isinstance(net, dict) or not isinstance(net.get("input_size"), int):
            return "'net_config' lacks the network's input_size"
    if kind == MODEL:
        classifier, aligner = payload["classifier"], payload["aligner"]
        if not isinstance(classifier, dict) or not state(classifier.get("state")):
            return "'classifier' lacks its weights"
        if classifier.get("arch") not in ARCHS or classifier.get("cam_stride") not in CAM_STRIDES:
            return f"classifier arch {classifier.get('arch')!r} or CAM stride {classifier.get('cam_stride')!r}"
        if SIZE.problem(payload["size"]):
            return f"size {SIZE.problem(payload['size'])}"
        if not isinstance(payload["classes"], (list, tuple)) or list(payload["classes"]) != list(FINDINGS):
            return f"its classes are not dmfast's {len(FINDINGS)} findings"
        if aligner is not None and not (isinstance(aligner, dict) and state(aligner.get("state")) and
                                        isinstance(aligner.get("input_size"), int)):
            return "'aligner' lacks its weights or input size"
        splits, patients = payload.get("splits"), payload.get("patients")
        if payload.get("config") is not None and not isinstance(payload["config"], dict):
            return "its run's settings ('config') are not a dict"
        if splits is not None and not (isinstance(splits, dict) and all(
                isinstance(splits.get(k), list) and all(isinstance(n, str) for n in splits[k])
                for k in ("train", "val", "test"))):
            return "'splits' lacks the lists of training, validation and test image names"
        if patients is not None and not (isinstance(patients, list) and all(isinstance(p, str) for p in patients)):
            return "'patients' is not a list of patient IDs"
    return None


def non_finite(state: dict) -> list:
    """The names of the floating-point tensors of ``state`` holding NaN or infinite values (a diverged run)."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not torch.isfinite(v).all()]


def _a(what: str) -> str:
    return f"{'an' if what[0] in 'aeiou' else 'a'} {what}"


def save_anchor(path, anchor: torch.Tensor) -> Path:
    """The anchor image ``[1, 1, S, S]`` (float, [-1, 1]) as a bare tensor."""
    return atomic_torch_save(path, anchor)


def load_anchor(path) -> torch.Tensor:
    """The anchor image of ``dmfast align`` as ``[S, S]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"anchor {path} not found")
    try:
        anchor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable anchor ({type(error).__name__})") from None
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 4 or anchor.shape[:2] != (1, 1):
        raise ValueError(f"{path}: not an anchor image (expected a [1, 1, S, S] tensor)")
    return anchor[0, 0]
