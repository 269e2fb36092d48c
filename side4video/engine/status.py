"""How a run ended: one enum read by the training loop, SLURM tasks, the CLI and the demo.
Every status is a clean end with the last step saved (`train` exits 0).

A failure is not a status: it is an exception (errors.py: UserError for bad input, RunFailed for a
run that cannot go on), raised on every rank and turned into an exit code by the CLI.
"""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    # a str Enum: summary.json and submitit results hold the plain word, and compare equal to it
    FINISHED = "finished"  # the step budget was spent; final evaluation, checkpoint and export done
    STOPPED = "stopped"  # train.stop_at_step was reached: saved, asked to stop there
    PREEMPTED = "preempted"  # a stop request (signal) all ranks agreed on: saved; a SLURM job requeues

    @property
    def complete(self) -> bool:
        """The run did all it was asked to (a SLURM job that ends otherwise is marked failed
        unless it was requeued)."""
        return self is RunStatus.FINISHED

    @classmethod
    def read(cls, value: object) -> "RunStatus":
        """From a summary or a job result; an older result without a status finished."""
        return cls(value or cls.FINISHED.value)
