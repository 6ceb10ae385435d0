"""Helpers shared by the tests and the benchmarks: devices, dtypes, tolerances, seeded random inputs and the shared
data folder."""

import os
from pathlib import Path

import torch

FLOAT_DTYPES = [torch.float64, torch.float32]
REDUCED_DTYPES = [torch.float16, torch.bfloat16]  # CUDA only

# (rtol, atol) of the fused ops against their float64/float32 eager references.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

NO_CUDA = "no CUDA GPU, or dmfast built without its CUDA kernels"


def cuda_available() -> bool:
    """Whether the CUDA kernels can run here: a GPU, and an extension built with them."""
    from .ops import cuda_ready

    return cuda_ready()


def devices() -> list:
    """The devices to test on, as pytest parameters: "cpu", and "cuda" skipped unless :func:`cuda_available`."""
    import pytest

    return ["cpu", pytest.param("cuda", marks=needs_cuda())]


def needs_cuda():
    """A pytest mark that skips a test unless :func:`cuda_available`."""
    import pytest

    return pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)


def tolerance(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def rand(shape, gen: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Standard normal values from ``gen`` (drawn on the CPU, so a seed gives the same values on every device)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def shared_data(name: str) -> Path:
    """A folder of the project's shared data: ``$DMFAST_SHARED_DATA/<name>``, by default ``../shared/data/<name>``
    beside the repository."""
    root = os.environ.get("DMFAST_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root) / name


def phantom_with_cache(folder, count: int, size: int, seed: int) -> tuple:
    """A phantom dataset and its image cache in ``folder``: (data folder, cache folder)."""
    from .data.cache import prepare
    from .phantom import synthesize

    data = synthesize(Path(folder) / "data", count=count, size=size, seed=seed)
    return data, prepare(data, Path(folder) / "cache", size=size, workers=2)


def assert_model_file_matches(checkpoint, folder, gen: torch.Generator, moved=()) -> None:
    """Export ``checkpoint`` to a model file, move the file and the folders ``moved`` (e.g. the alignment run)
    elsewhere, load it with ``weights_only=True``, and compare its probabilities, CAMs and alignment with the
    checkpoint's on random images (float32 and float16 files)."""
    import shutil

    from .checkpoints import MODEL
    from .inference import Classifier, export_model, load_model

    expected = Classifier(checkpoint, "cpu")
    pixels = torch.randint(0, 256, (3, 1, expected.size, expected.size), generator=gen, dtype=torch.uint8)
    want = expected(pixels)
    for half, tolerance in ((False, 1e-5), (True, 5e-2)):
        exported = export_model(checkpoint, Path(folder) / "export" / "model.pt", half=half)
        target = Path(folder) / "elsewhere" / ("half.pt" if half else "model.pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(exported, target)
        assert torch.load(target, weights_only=True)["format"] == MODEL
        for path in moved:
            shutil.move(path, f"{path}.moved")
        try:
            got = load_model(target, "cpu")(pixels)
        finally:
            for path in moved:
                shutil.move(f"{path}.moved", path)
        torch.testing.assert_close(got.probabilities, want.probabilities, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(got.cams, want.cams, rtol=tolerance, atol=tolerance * want.cams.abs().max())
        assert (got.theta is None) == (want.theta is None)
        if want.theta is not None:
            torch.testing.assert_close(got.theta, want.theta, rtol=tolerance, atol=tolerance)


def write_dicom(path, pixels, photometric: str = "MONOCHROME2", **elements) -> Path:
    """A single-frame DICOM X-ray (Digital X-Ray, explicit VR little endian) of ``pixels`` (uint8 or uint16
    ``[H, W]``, or uint8 ``[H, W, 3]`` RGB) with extra data ``elements`` (e.g. ``RescaleSlope``,
    ``WindowCenter``, ``NumberOfFrames``)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
