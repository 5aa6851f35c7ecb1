"""Preemption: SIGTERM (a scheduler's warning before preemption or the time limit) asks the run to
finish its optimizer step, write a checkpoint and exit with REQUEUE_EXIT, which launch/slurm/kto.sbatch
requeues. A second SIGTERM, or `sigterm_timeout_s` without finishing, exits at once.

Ranks get the signal at different moments (or only some of them do), so the training loop takes the
decision to stop together once per step (`any_rank` of `requested`): every rank stops after the same
step, and none waits for another. This module imports no torch.distributed (launch/plot.py uses it).
"""

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped cleanly, resume me
KILLED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
SAME_SIGNAL_S = 2.0  # launchers forward the SIGTERM a scheduler also sends the whole job: one request


class Preempted(Exception):
    """The run stopped on SIGTERM after writing a checkpoint; the launch script exits with REQUEUE_EXIT."""


class SigtermStop:
    """Turns SIGTERM into a request to stop after the current optimizer step (main thread only)."""

    def __init__(self, timeout_s: int) -> None:
        self.timeout_s, self.requested_at = timeout_s, None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.requested_at is not None:
            if now - self.requested_at > SAME_SIGNAL_S:
                os._exit(KILLED_EXIT)  # asked twice: no checkpoint of this step
            return
        self.requested_at = now
        logger.warning("SIGTERM: finishing this optimizer step, then writing a checkpoint (send SIGTERM again to "
                       "exit at once; exiting anyway in %d s).", self.timeout_s)
        timer = threading.Timer(self.timeout_s, os._exit, args=(KILLED_EXIT,))
        timer.daemon = True
        timer.start()

    @property
    def requested(self) -> bool:
        """Whether this rank got SIGTERM."""
        return self.requested_at is not None
