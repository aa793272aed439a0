"""The errors tsa's library raises for a user's mistake or a broken run; the commands (tsa/cli/) turn them into
one line on stderr and an exit status (UsageError 2, the others 1)."""


class UsageError(ValueError):
    """A mistake in the options or paths a user gave."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight that is NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint file that does not load or holds non-finite values."""


class DataError(ValueError):
    """A dataset none of whose videos decodes."""


class TrainingInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after finishing an optimizer step and saving a checkpoint at it; the
    message says where and how to resume. `exit_status` is 128 + the signal number (130, 143)."""

    def __init__(self, message: str, signal_number: int, step: int, checkpoint):
        super().__init__(message)
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        self.exit_status = 128 + signal_number
