"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends before it
pre-empts a job): the loop finishes the optimizer step it is in, every process saves the checkpoint of that step,
and the run ends with TrainingInterrupted, whose message says where the checkpoint is and how to resume.

Processes may receive the signal at different steps (or only one of them may receive it), so the loop asks
`StopSignals.agreed(accelerator)` after every optimizer step: one all-gather of a flag, and every process stops
at the same step.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while active, the first SIGINT or SIGTERM is only recorded (`received`) and the loop
    stops after its current optimizer step; a second SIGINT raises KeyboardInterrupt at once. A repeated SIGTERM
    changes nothing (schedulers repeat it; their SIGKILL follows anyway). Handlers are installed only in the main
    thread (Python's rule for signal handlers) and the previous ones are restored on exit."""

    def __init__(self, announce: bool = True, prog: str = "tsa-train"):
        self.announce, self.prog = announce, prog
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        return False

    def _handle(self, number, frame):
        if self.received is None:
            self.received = number
            if self.announce:  # os.write: print() may be inside a write of the progress bar when the signal lands
                os.write(2, f"\n{self.prog}: {signal.Signals(number).name} received: finishing this optimizer step "
                            "and saving a checkpoint (Ctrl-C again to stop at once, without saving)\n".encode())
            return
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
            raise KeyboardInterrupt

    def agreed(self, accelerator) -> int | None:
        """The signal that stops the run after this optimizer step, the same on every process (the largest signal
        number any process received), or None to go on. A collective call: every process makes it every step."""
        if accelerator.num_processes == 1:
            return self.received
        flags = accelerator.gather(torch.tensor([self.received or 0], device=accelerator.device))
        number = int(flags.max())
        return number or None


def signal_name(number: int) -> str:
    return signal.Signals(number).name
