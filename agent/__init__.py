"""dispatch-agent: runs on every managed host, executes what dispatchd sends, reports back."""

__version__ = "0.1.0"
