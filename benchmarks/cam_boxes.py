"""Benchmark of dmfast.ops.cam_boxes (CAM -> boxes) against OpenCV and SciPy pipelines.

    python -m benchmarks.cam_boxes [--device cuda] [--threads N] [--out results.json]

32 images x 8 classes of 16x16 CAMs, boxes reported at 512x512, Wang et al.'s two thresholds (60/255, 180/255),
top 8 boxes by peak activation. Baselines, each at its best: one batched float32 F.interpolate of the normalised
maps, then per map and level (a) cv2.connectedComponentsWithStats or (b) scipy.ndimage.label + find_objects, with
np.maximum.at for the regions' peaks.
"""

import numpy as np
import torch
import torch.nn.functional as F

from dmfast import ops, reference

from .common import best_median_ms, environment, parse, parser, report

THRESHOLDS = (60 / 255, 180 / 255)


def make_cams(batch, classes, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * classes, 1, size, size, generator=g)
    for _ in range(2):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return x.view(batch, classes, size, size).to(device)


def opencv_label(binary):
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    x, y, w, h = stats[1:, 0], stats[1:, 1], stats[1:, 2], stats[1:, 3]
    return labels, n - 1, np.stack([x, y, x + w, y + h], 1)


def scipy_label(binary):
    from scipy import ndimage

    labels, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=int))
    boxes = [(c.start, r.start, c.stop, r.stop) for r, c in ndimage.find_objects(labels)]
    return labels, n, np.array(boxes, dtype=np.int64).reshape(-1, 4)


def eager_boxes(cams, image_size, thresholds, max_boxes, label):
    """The eager pipeline at its best: one batched float32 F.interpolate of the normalised maps, then per map and
    level a threshold, a labelling library and np.maximum.at for the peak of each region."""
    maps = cams.reshape(-1, *cams.shape[-2:]).float().cpu()
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    up = F.interpolate(((maps - low) / (high - low))[:, None], size=image_size, mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    boxes = np.zeros((len(up), max_boxes, 4), np.int64)
    counts = np.zeros(len(up), np.int64)
    for i, image in enumerate(up):
        found = []
        for level, t in enumerate(thresholds):
            labels, n, level_boxes = label(image >= t)
            peaks = np.zeros(n + 1, np.float32)
            np.maximum.at(peaks, labels.ravel(), image.ravel())
            found += [(-peaks[k + 1], level, k, level_boxes[k]) for k in range(n)]
        found.sort(key=lambda f: f[:3])
        counts[i] = len(found)
        for k, entry in enumerate(found[:max_boxes]):
            boxes[i, k] = entry[3]
    return boxes, counts


def run(args) -> dict:
    threads = args.threads
    cams = make_cams(args.batch, args.classes, args.cam_size, args.device)
    size = (args.image_size, args.image_size)
    impls = {
        "fused": lambda: ops.cam_boxes(cams, size, THRESHOLDS, args.max_boxes),
        "scipy label + find_objects": lambda: eager_boxes(cams, size, THRESHOLDS, args.max_boxes, scipy_label),
    }
    try:
        import cv2  # noqa: F401

        impls["opencv connectedComponentsWithStats"] = lambda: eager_boxes(cams, size, THRESHOLDS, args.max_boxes,
                                                                           opencv_label)
    except ImportError:
        print("opencv-python-headless is not installed (pip install '.[bench]'): skipping the OpenCV baseline")
    # Same regions everywhere (the float64 reference is the oracle; float32 baselines may differ by a pixel).
    _, _, fused_counts = impls["fused"]()
    _, _, ref_counts = reference.cam_boxes(cams, size, THRESHOLDS, args.max_boxes)
    assert torch.equal(fused_counts.cpu(), ref_counts)
    for name in list(impls)[1:]:
        counts = impls[name]()[1]
        agree = (counts == ref_counts.view(-1).numpy()).mean()
        print(f"{name}: region counts agree with the float64 reference on {agree:.1%} of maps")
    times = best_median_ms(impls, threads, args.min_run_time, args.rounds)
    megapixels = cams.shape[0] * cams.shape[1] * len(THRESHOLDS) * size[0] * size[1] / 1e6
    case = f"{args.batch}x{args.classes} maps {args.cam_size}px -> {args.image_size}px, 2 thresholds"
    config = {"batch": args.batch, "classes": args.classes, "cam_size": args.cam_size, "image_size": args.image_size,
              "thresholds": THRESHOLDS, "max_boxes": args.max_boxes, "megapixels_thresholded": megapixels,
              "fused_ms_per_megapixel": times["fused"] / megapixels}
    print(f"fused: {times['fused'] / megapixels:.3f} ms per thresholded megapixel")
    return report("cam_boxes", {case: times}, "fused", environment(args.device, threads), config, args.out)


def parse_args(argv=None):
    p = parser(__doc__, rounds=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--cam-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--max-boxes", type=int, default=8)
    return parse(p, "cam_boxes", argv)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
