"""Lightning callbacks, one compression technique per file, sharing lightcook.callbacks.base.

Whatever order they are listed in, they restructure the model in one canonical order:
MoEfication → structured pruning → N:M sparsity → quantization → distillation.
"""

from lightcook.callbacks.base import CompressionCallback, StepSchedule, select_modules
from lightcook.callbacks.distillation import DistillationCallback
from lightcook.callbacks.moefication import MoEficationCallback
from lightcook.callbacks.quantization import QuantizationCallback
from lightcook.callbacks.report import CompressionReport
from lightcook.callbacks.sparsity import SparsityCallback
from lightcook.callbacks.structured_pruning import StructuredPruningCallback

__all__ = [
    "CompressionCallback",
    "CompressionReport",
    "DistillationCallback",
    "MoEficationCallback",
    "QuantizationCallback",
    "SparsityCallback",
    "StepSchedule",
    "StructuredPruningCallback",
    "select_modules",
]
