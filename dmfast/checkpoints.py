"""Every file format dmfast writes and reads back: the classifier checkpoint (``dmfast train``: ``model``,
``config``, ``splits``, ``epoch`` and the optimiser, scheduler and random states to resume), the alignment
checkpoint (``dmfast align``: ``model``, ``net_config``, ``config``, ``history``) and its anchor image, and the masks
file (``dmfast masks``: ``masks [14, MASK_SIZE, MASK_SIZE]`` in {0, 1}, ``average``, ``has_mask``, ``kind``), and
the portable model file (``dmfast export``, and ``model.pt`` of every ``dmfast train`` run): weights only, read with
``torch.load(weights_only=True)``, self-contained: ``classes``, ``size``, ``normalisation``, ``classifier`` (``arch``,
``cam_stride``, ``state`` with the disease masks when trained with them), ``aligner`` (``input_size``, ``state``,
``anchor``) or None, ``half`` and ``written_by`` (the versions of dmfast, torch, Python and numpy); nothing is
read from a path. For ``dmfast eval``'s check of test images against the training images wherever the file
travels, it also keeps (optional fields: files written before them read as None) its training run's settings
``config`` (the TrainConfig as a dict, its paths a record only, ``format`` as detected), its ``splits`` (``train``,
``val``, ``test`` image names, ``seed``, ``val_fraction``, ``folds``), ``patients``: the patient IDs (str) of its
training and validation images, None when the training data was not readable at export, and ``ood``: the training
images' pooled feature statistics (``mean``, ``std`` per channel, ``threshold`` calibrated on the validation images;
see :func:`dmfast.inference.feature_statistics`), None when its image cache was not readable at export.

Each is a dict saved atomically with a ``format`` tag, a format ``version`` and a ``seal``: a digest of each
setting the weights cannot show (architecture, CAM stride, image size, classes, the alignment network's input size)
and of the weights' names and shapes. A dilated ResNet has the same weights at CAM stride 16 and 32, and a
convolutional network the same at any size, so an edited stride or size would load and predict other maps; the seal
tells. Reading checks the tag, the version, every field, the seal, and that every weight is finite (and every
BatchNorm variance non-negative), and names the file and the problem (missing, unreadable, another kind of file,
written by a newer dmfast, edited, diverged). Files of dmfast 0.1.0 carry no tag and read as version 1; files
written before the seal are read without it.
"""

import hashlib
import pickle
from pathlib import Path

import torch

from .config import CAM_STRIDES, MIN_CAM_CELLS, SIZE, TrainConfig, arch_problem, defaults
from .data.dataset import FINDINGS
from .errors import ModelFileError
from .io import atomic_torch_save

VERSION = 1
MASK_SIZE = 64  # side of the stored masks; the classifier resizes them to its feature map
# format tag -> (what it is called in messages, keys it must have)
CLASSIFIER, ALIGNMENT, MASKS, MODEL = "dmfast.classifier", "dmfast.alignment", "dmfast.masks", "dmfast.model"
KINDS = {CLASSIFIER: ("classifier checkpoint", ("model", "config")),
         ALIGNMENT: ("alignment checkpoint", ("model", "net_config")), MASKS: ("masks file", ("masks",)),
         MODEL: ("model file", ("classes", "size", "normalisation", "classifier", "aligner"))}


def save(path, kind: str, payload: dict) -> Path:
    """Write ``payload`` as a file of format ``kind`` (one of :data:`KINDS`), sealed, atomically."""
    payload = {k: v for k, v in payload.items() if k not in ("format", "version", "seal")}
    return atomic_torch_save(path, {"format": kind, "version": VERSION, **payload, "seal": _seal(kind, payload)})


def load(path, kind) -> dict:
    """Read a file of format ``kind``, checked; a masks file's ``masks`` must also be ``[14, h, w]`` and finite.
    ``kind`` may be a tuple of formats, the file being any of them; ``payload["format"]`` then says which it is.
    Every format is read weights only (tensors and plain values; numpy arrays, as earlier checkpoints kept numpy's
    random state): a file that would run code when unpickled is refused, whatever it is called."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    what = " or ".join(KINDS[k][0] for k in kinds)
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} {path} not found")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():  # not objects besides tensors: garbage
            raise ModelFileError(f"{path}: not a readable {what} (not a file torch.load reads: damaged, truncated or "
                                 "another format)") from None
        raise ModelFileError(f"{path}: not {_a(what)}: it holds objects besides tensors and plain values, so it is not "
                             "read (dmfast reads its files weights only, never running code from them)") from None
    except Exception as error:  # a truncated or foreign file: say which and why, not a pickle traceback
        raise ModelFileError(f"{path}: not a readable {what} ({type(error).__name__}: {error})") from None
    found = (payload.get("format") or _untagged(payload, kinds)  # untagged: by its keys
             if isinstance(payload, dict) else None)
    if found not in (*kinds, None):
        raise ModelFileError(f"{path}: {_a(KINDS[found][0] if found in KINDS else f'{found} file')}, not {_a(what)}")
    kind = found or kinds[0]
    what, required = KINDS[kind] if found else (what, KINDS[kind][1])
    if found and payload.get("version", 1) > VERSION:
        raise ModelFileError(f"{path}: {what} of format version {payload['version']}, written by a newer dmfast; this "
                             f"one reads up to version {VERSION}")
    if not found or any(key not in payload for key in required):
        raise ModelFileError(f"{path}: not a dmfast {what} (expected a dict with {', '.join(map(repr, required))})")
    problem = _structure_problem(kind, payload)
    if problem:
        raise ModelFileError(f"{path}: not a usable {what}: {problem}")
    problem = _edited(kind, payload) or (_masks_problem(payload["masks"]) if kind == MASKS else None) or \
        _weights_problem(kind, payload)
    if problem:
        raise ModelFileError(f"{path}: {problem}")
    payload.setdefault("format", kind)  # files of dmfast 0.1.0 carry no tag
    return payload


def _masks_problem(masks, cells: int | None = None) -> str | None:
    """What is wrong with disease masks (a masks file's, or those a classifier was trained with), or None. ``cells``:
    the side of the CAM grid they attend to (masks coarser than it would blur the maps)."""
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != len(FINDINGS):
        return f"not a dmfast masks file (expected a dict with 'masks' [{len(FINDINGS)}, h, w])"
    if masks.shape[1] != masks.shape[2] or masks.shape[1] < max(MIN_CAM_CELLS, cells or 0):
        return (f"masks of {masks.shape[1]} x {masks.shape[2]} per class; masks are square maps of at least "
                f"{max(MIN_CAM_CELLS, cells or 0)} x {max(MIN_CAM_CELLS, cells or 0)} over the canonical chest "
                "(dmfast masks writes them)")
    if not torch.isfinite(masks).all():
        return "the masks contain NaN or infinite values"
    if masks.numel() and not (masks.min() >= 0 and masks.max() <= 1):
        return (f"mask values must lie in [0, 1] (attention weights), found {masks.min().item():g} to "
                f"{masks.max().item():g}")
    return None


def _get(fields, key):
    """``fields[key]``, or None where ``fields`` is not a dict (a damaged file, refused when read)."""
    return fields.get(key) if isinstance(fields, dict) else None


def _states(kind: str, payload: dict) -> dict:
    """The state dicts of a file of format ``kind``, by the name its messages give them."""
    if kind in (CLASSIFIER, ALIGNMENT):
        states = {"model": payload.get("model")}
    elif kind == MODEL:
        states = {"classifier": _get(payload.get("classifier"), "state"),
                  "aligner": _get(payload.get("aligner"), "state")}
    else:
        states = {}
    return {name: state for name, state in states.items() if isinstance(state, dict)}


def _sealed(kind: str, payload: dict) -> dict:
    """The fields of a file of format ``kind`` its seal covers: what its weights cannot show, and their layout."""
    fields = {f"{name} weights": sorted((k, tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", type(v))))
                                        for k, v in state.items())
              for name, state in _states(kind, payload).items()}
    if kind == CLASSIFIER:
        fields.update({f"config {k}": _get(payload.get("config"), k) for k in ("arch", "size", "cam_stride")})
    if kind == ALIGNMENT:
        fields["net_config"] = payload.get("net_config")
    if kind == MODEL:
        fields.update({k: payload.get(k) for k in ("classes", "size", "normalisation")})
        fields.update({f"classifier {k}": _get(payload.get("classifier"), k) for k in ("arch", "cam_stride")})
        fields.update({f"aligner {k}": _get(payload.get("aligner"), k) for k in ("input_size", "arch")})
    return fields


def _seal(kind: str, payload: dict) -> dict:
    return {name: hashlib.sha256(repr(value).encode()).hexdigest()[:16]
            for name, value in _sealed(kind, payload).items()}


def _edited(kind: str, payload: dict) -> str | None:
    """The sealed fields of ``payload`` changed since dmfast wrote it, as a message, or None (also for files
    written before seals)."""
    seal = payload.get("seal")
    if seal is None:
        return None
    if not isinstance(seal, dict):
        return "its seal is not a dict of digests (a damaged or edited file)"
    changed = [name for name, digest in _seal(kind, payload).items() if seal.get(name) != digest]
    if not changed:
        return None
    verb = "matches" if len(changed) == 1 else "match"
    return (f"edited after dmfast wrote it: its {' and '.join(changed)} no longer {verb} its seal (a model's "
            "settings must match its weights: use the file as its run wrote it, or export it again from the run)")


def _weights_problem(kind: str, payload: dict) -> str | None:
    """Weights that would predict NaN (a diverged run, or an edited file), or disease masks in a classifier's state
    that do not fit its CAM grid, as a message; or None."""
    for name, state in _states(kind, payload).items():
        bad = _non_finite(state)
        if bad:
            return (f"its {name} weights hold NaN or infinite values ({', '.join(bad[:3])}): a diverged run (a lower "
                    "--lr, or an earlier epoch's best.pt) or a damaged file")
        negative = [k for k, v in state.items() if k.endswith("running_var") and v.numel() and v.min() < 0]
        if negative:
            return f"its {name} weights hold negative BatchNorm variances ({', '.join(negative[:3])}): a damaged file"
    if kind in (CLASSIFIER, MODEL):
        state, settings = (payload["classifier"]["state"], {**payload["classifier"], "size": payload["size"]}) \
            if kind == MODEL else (payload["model"], payload["config"])
        stride = settings.get("cam_stride", defaults(TrainConfig)["cam_stride"])  # of dmfast 0.1.0: the default
        problem = None if state.get("masks") is None else \
            _masks_problem(state["masks"], settings["size"] // stride if stride in CAM_STRIDES else None)
        if problem:
            return f"the disease masks it was trained with: {problem.replace('not a dmfast masks file', 'not masks')}"
    return None


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
        if arch_problem(config["arch"]):
            return f"arch {arch_problem(config['arch'])}"
    if kind == ALIGNMENT:
        net = payload["net_config"]
        if not isinstance(net, dict) or not isinstance(net.get("input_size"), int):
            return "'net_config' lacks the network's input_size"
        if set(net) - {"input_size", "arch"} or arch_problem(net.get("arch", "resnet18")):
            return f"'net_config' {net!r}: only input_size and arch (a backbone) are known"
    if kind == MODEL:
        classifier, aligner = payload["classifier"], payload["aligner"]
        if not isinstance(classifier, dict) or not state(classifier.get("state")):
            return "'classifier' lacks its weights"
        if arch_problem(classifier.get("arch")) or classifier.get("cam_stride") not in CAM_STRIDES:
            return f"classifier arch {classifier.get('arch')!r} or CAM stride {classifier.get('cam_stride')!r}"
        if SIZE.problem(payload["size"]):
            return f"size {SIZE.problem(payload['size'])}"
        if not isinstance(payload["classes"], (list, tuple)) or list(payload["classes"]) != list(FINDINGS):
            return f"its classes are not dmfast's {len(FINDINGS)} findings"
        if aligner is not None and not (isinstance(aligner, dict) and state(aligner.get("state")) and
                                        isinstance(aligner.get("input_size"), int)):
            return "'aligner' lacks its weights or input size"
        if aligner is not None and arch_problem(aligner.get("arch", "resnet18")):
            return f"aligner arch {arch_problem(aligner.get('arch'))}"
        splits, patients = payload.get("splits"), payload.get("patients")
        if payload.get("config") is not None and not isinstance(payload["config"], dict):
            return "its run's settings ('config') are not a dict"
        if splits is not None and not (isinstance(splits, dict) and all(
                isinstance(splits.get(k), list) and all(isinstance(n, str) for n in splits[k])
                for k in ("train", "val", "test"))):
            return "'splits' lacks the lists of training, validation and test image names"
        if patients is not None and not (isinstance(patients, list) and all(isinstance(p, str) for p in patients)):
            return "'patients' is not a list of patient IDs"
        ood = payload.get("ood")
        if ood is not None and not (isinstance(ood, dict) and all(isinstance(ood.get(k), torch.Tensor) and
                                                                   ood[k].dim() == 1 for k in ("mean", "std")) and
                                    ood["mean"].shape == ood["std"].shape and bool((ood["std"] > 0).all()) and
                                    isinstance(ood.get("threshold"), float) and ood["threshold"] >= 0):
            return "'ood' is not the training images' feature statistics (mean, std > 0, threshold)"
        weight = classifier["state"].get("fc.weight")
        if ood is not None and weight is not None and ood["mean"].shape[0] != weight.shape[-1]:
            return f"'ood' holds statistics of {ood['mean'].shape[0]} channels, its classifier has {weight.shape[-1]}"
    return None


def _non_finite(state: dict) -> list:
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
        raise ModelFileError(f"anchor {path} not found")
    try:
        anchor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(f"{path}: not a readable anchor ({type(error).__name__})") from None
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 4 or anchor.shape[:2] != (1, 1):
        raise ModelFileError(f"{path}: not an anchor image (expected a [1, 1, S, S] tensor)")
    return anchor[0, 0]
