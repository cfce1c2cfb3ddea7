"""The data error, on its own so that catching it (every `refilled` command does) imports no torch."""


class DataError(RuntimeError):
    """A dataset file is missing or wrong. The message names the file, the problem, and how to obtain it."""
