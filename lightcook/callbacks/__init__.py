"""Lightning callbacks, one compression technique per file, sharing lightcook.callbacks.base."""

from lightcook.callbacks.base import CompressionCallback, StepSchedule, select_modules

__all__ = ["CompressionCallback", "StepSchedule", "select_modules"]
