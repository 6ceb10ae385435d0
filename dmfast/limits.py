"""The ranges and limits that the settings (:mod:`dmfast.config`), the data readers and the ops share, each
written once; a leaf module, so that every layer may read it. The ops' limits are the C++ kernels' too
(``csrc/checks.h``, ``csrc/affine_smooth.h``): ``tests/test_architecture.py`` compares them."""

import math
from dataclasses import dataclass

from .errors import SettingsError

@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ``low``/``high`` bounds (None: unbounded; ``open_low`` excludes
    ``low``), an int or a finite float."""
    low: float | None = None
    high: float | None = None
    integer: bool = True
    open_low: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = (None if v is None else str(int(v)) if float(v).is_integer() and abs(v) < 1e10 else f"{v:g}"
                     for v in (self.low, self.high))
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.open_low else '['}{low}, {high}]"
        if low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {low}"
        return f"{kind} <= {high}" if high is not None else kind

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` ("must be ..., got ..."), or None."""
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (self.integer and not float(value).is_integer()) or \
            (self.low is not None and (value <= self.low if self.open_low else value < self.low)) or \
            (self.high is not None and value > self.high)
        return f"must be {self.describe()}, got {value!r}" if bad else None

    def check(self, value, name: str):
        """``value`` (None passes: an unset optional setting) or a SettingsError naming ``name`` and the range."""
        if value is None:
            return None
        problem = self.problem(value)
        if problem:
            raise SettingsError(f"{name} {problem}")
        return int(value) if self.integer else float(value)


# The working image size: a ResNet needs 32 px to have one feature-map cell; the paper's 512 by default.
SIZE = Range(32, 4096)
DEFAULT_SIZE = 512
FRACTION = Range(0, 1, integer=False)
CAM_STRIDES = (16, 32)  # a classifier's last feature map: its backbone's own (32), or one stage undilated (16)

# The ops' limits, as the C++ kernels check them
OP_MAX_SIDE = 1 << 16  # the largest image side (H, W, pool) the ops take: larger ones only exhaust memory (kMaxSide)
MAX_BOXES = 65536  # cam_boxes' boxes per map at most (kMaxBoxes)
MAX_THRESHOLDS = 256  # cam_boxes' threshold levels at most (checked in dmfast.ops)
THETA_LIMIT = 1e6  # affine_smooth's domain: |theta| entries beyond it give NaN (kThetaLimit)
