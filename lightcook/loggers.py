"""A CSV logger that keeps the rows of the run it resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a run resumes in the same directory
(a requeued Slurm job, ``ckpt_path=auto``). This one keeps it and appends, extending the header when
new columns appear.

Example:
    >>> import tempfile
    >>> logger = ResumableCSVLogger(tempfile.mkdtemp(), name="csv", version="")
    >>> logger.log_metrics({"train/loss": 1.0}, step=0); logger.save()
"""

from __future__ import annotations

import csv
from typing import cast

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from typing_extensions import override


class _ResumingWriter(ExperimentWriter):
    @override
    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv`` (Lightning deletes it here)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class ResumableCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends to an existing ``metrics.csv`` on resume."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return cast(ExperimentWriter, self._experiment)  # always the _ResumingWriter made here
