"""Data-parallel training over MPI: the processes of one run and what they exchange.

    mpiexec -n 2 python -m minitf.train --out runs/char     # 2 ranks, one global batch

Under `mpiexec`, every process (rank) builds the same model from the same seed or
checkpoint, draws the same global batch of window starts, computes the forward and backward
of its own rows of it (minitf.data.batch_rows), and the ranks' gradients are summed by one
MPI Allreduce of the optimizer's flat gradient buffer (AdamW.flat_grads) per step, each
rank's gradient already weighted by its share of the global batch. Clipping and AdamW then
run on the same reduced gradient on every rank, so the weights stay identical without ever
being sent. Two Allreduces of one number each per step carry the loss (for the log and
the divergence check) and whether a rank was asked to stop (SIGINT), so that every rank
stops at the same step.

A run is launched under MPI when the environment of an MPI launcher says so: PMI_SIZE
(MPICH's Hydra, Intel MPI) or OMPI_COMM_WORLD_SIZE (Open MPI) greater than 1. Otherwise,
including `mpiexec -n 1`, the run is one process, `World()`, and mpi4py is never imported:
it is an optional dependency (`pip install "minitf[mpi]"`, which brings MPICH from the
package index too).

Failures: an error the ranks reach together (a diverged step, a stop request: both decided
from reduced values) ends every rank with the same status and rank 0's message; an error in
one rank alone (an exception on any rank, a failed checkpoint write) prints that rank's
message and calls MPI_Abort, which makes the launcher end every rank, instead of leaving
the others waiting in the next Allreduce. A rank killed by a signal is seen by the launcher
itself (MPICH's Hydra ends the others and exits non-zero).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .cli import error_line

# environment variables an MPI launcher sets to the number of processes of the job
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class MPIUnavailable(RuntimeError):
    """Started by an MPI launcher, but mpi4py cannot be imported."""


def launched_size() -> int:
    """The number of processes the MPI launcher started, from its environment
    (SIZE_VARIABLES); 1 outside a launcher."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


class World:
    """One process alone: rank 0 of 1. Every collective is the identity (nothing is
    copied or sent), so single-process training runs exactly as without this module."""

    rank = 0  # this process's index, 0 .. size-1
    size = 1  # the number of processes
    local_size = 1  # processes of the job on this machine

    def cores(self) -> int:
        """This process's share of the machine's cores (at least 1)."""
        return max(1, (os.cpu_count() or 1) // self.local_size)

    def sum_gradients(self, flat_grads: np.ndarray) -> None:
        """Replace `flat_grads` (P,) float32 or float64, by its sum over the ranks, in place."""

    def sum_values(self, values: np.ndarray) -> np.ndarray:
        """The sum over the ranks of a small float64 array (a few scalars per step)."""
        return values

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        return flag

    def barrier(self) -> None:
        """Return when every rank has called it."""

    def abort(self, status: int) -> None:
        """End every rank of the job with `status` (here: this process)."""
        sys.exit(status)


class MPIWorld(World):
    """The ranks of an MPI job (mpi4py's COMM_WORLD).

    Raises:
        MPIUnavailable: mpi4py is not installed (the message says how to install it).
    """

    def __init__(self):
        try:
            # imported only under a launcher: single-process runs never load MPI
            from mpi4py import MPI
        except ImportError as e:
            raise MPIUnavailable(
                f"this process was started by an MPI launcher ({_launcher_variable()}) but "
                f"mpi4py cannot be imported ({e}); install it with: pip install "
                f"\"minitf[mpi]\"") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()

    def sum_gradients(self, flat_grads: np.ndarray) -> None:
        # in place: no second parameter-sized buffer
        self.comm.Allreduce(self.MPI.IN_PLACE, flat_grads, op=self.MPI.SUM)

    def sum_values(self, values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values)
        self.comm.Allreduce(values, out, op=self.MPI.SUM)
        return out

    def broadcast_flag(self, flag: bool) -> bool:
        return bool(self.comm.bcast(bool(flag), root=0))

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, status: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # the launcher forwards a rank's output through a pipe; an abort right after the
        # last line could end the job before that line was forwarded (seen once in CI)
        time.sleep(0.5)
        self.comm.Abort(status)
        # MPICH's MPI_Abort tells the launcher to end the job but may return before this
        # process is ended (measured with MPICH 5.0): nothing else of this rank may run
        os._exit(status)


def _launcher_variable() -> str:
    return ", ".join(f"{n}={os.environ[n]}" for n in SIZE_VARIABLES if n in os.environ)


def world() -> World:
    """The processes of this run: MPIWorld under an MPI launcher with more than one
    process (launched_size), else World().

    Raises:
        MPIUnavailable: launched by MPI without mpi4py installed.
    """
    return MPIWorld() if launched_size() > 1 else World()


def abort_on(world: World, error: BaseException, prog: str) -> None:
    """`error` ended this rank alone: print one line naming the rank and the error (a
    SystemExit's message was printed already), then end every rank of the job through
    MPI_Abort, with the exit status a command gives that error (minitf.cli): the SystemExit's
    code, 130 for SIGINT, 2 for bad input or a failed write, else 1."""
    if isinstance(error, SystemExit):
        status = error.code if isinstance(error.code, int) else 1
        what = f"ended with status {status}"
    else:
        status = (130 if isinstance(error, KeyboardInterrupt) else
                  2 if isinstance(error, (ValueError, OSError, MemoryError)) else 1)
        what = f"failed: {type(error).__name__}: {error_line(error)}"
    print(f"{prog}: rank {world.rank} of {world.size} {what}; ending all {world.size} "
          f"ranks (MPI_Abort)", file=sys.stderr)
    world.abort(status or 1)
