"""``dispatchctl``: the command line for devops-dispatch, a client of dispatchd's HTTP API only."""

__version__ = "0.1.0"
