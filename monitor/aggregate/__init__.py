"""Aggregation: classified frames in, windowed class fractions an operator can trust out.

Pure logic over values and timestamps passed in by the caller: no I/O, threads or clocks.
"""

from monitor.aggregate.sizes import (
    SIZE_BIN_EDGES,
    ClassSizes,
    SizeStats,
    SizeUnit,
    class_sizes,
    size_histogram,
    weighted_quantiles,
)
from monitor.aggregate.statistics import (
    MAX_CONFUSION_CONDITION,
    Z_95,
    ConfusionCorrection,
    EwmaFractions,
    adjusted_fractions,
    design_effect,
    normalise_confusion_matrix,
    slope_per_minute,
    wilson_interval,
    wilson_interval_from_fraction,
)
from monitor.aggregate.windows import (
    DEFAULT_WINDOWS_S,
    ClassStats,
    ClassTrend,
    FrameRecord,
    ProbeSnapshot,
    WindowAggregator,
    WindowStats,
)

__all__ = [
    "DEFAULT_WINDOWS_S",
    "MAX_CONFUSION_CONDITION",
    "SIZE_BIN_EDGES",
    "Z_95",
    "ClassSizes",
    "ClassStats",
    "ClassTrend",
    "ConfusionCorrection",
    "EwmaFractions",
    "FrameRecord",
    "ProbeSnapshot",
    "SizeStats",
    "SizeUnit",
    "WindowAggregator",
    "WindowStats",
    "adjusted_fractions",
    "class_sizes",
    "design_effect",
    "normalise_confusion_matrix",
    "size_histogram",
    "slope_per_minute",
    "weighted_quantiles",
    "wilson_interval",
    "wilson_interval_from_fraction",
]
