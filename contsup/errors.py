"""The one error type users see: a bad choice, named with the valid ones."""


class UsageError(ValueError):
    """A bad input (unknown name, impossible combination, missing file...).

    The CLI prints its message on one line and exits with status 2.
    """
