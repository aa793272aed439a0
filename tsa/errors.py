"""The errors tsa's library raises for a user's mistake or a broken run; the commands (tsa/cli/) turn them into
one line on stderr and an exit status (UsageError 2, the others 1)."""


class UsageError(ValueError):
    """A mistake in the options or paths a user gave."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight that is NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint file that does not load or holds non-finite values."""
