"""dispatchd: the task dispatch daemon."""

__version__ = "0.1.0"
