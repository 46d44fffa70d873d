"""The ``slurm`` fixture: a real single-node Slurm cluster for the session, stopped afterwards."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.slurm.cluster import LocalSlurm, missing_programs


@pytest.fixture(scope="session")
def slurm():
    """A running :class:`LocalSlurm` (2 CPUs); fails with the fix when Slurm is missing or not root."""
    missing = missing_programs()
    if missing:
        pytest.fail(f"Slurm/munge programs missing: {missing}; install them with `make slurm-install` (root)")
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
    cluster = LocalSlurm(cpus=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
