"""dispatchd: the task dispatch daemon.

A map, one folder a subsystem (each ``__init__`` says what it owns and may import):

    api/      HTTP routes, request and answer shapes, auth, live events (SSE), the console
    agents/   the gRPC agent port: stream admission, enrolment, sessions, registry, liveness
    engine/   tasks, the queue, running a task, every daemon-side timeout
    store/    models, migrations, the writer and its ledger, reads, retention
    ops/      metrics and the audit log

Beside them: ``__main__`` (the ``dispatchd`` command), ``config`` (its settings), ``server`` (the
lifetimes, wiring the subsystems together) and the shared vocabulary every subsystem may use and
which imports none of them: ``states``, ``errors``, ``taskspec``, ``identifiers``.

Imports go one way: api and agents over engine, engine over ops, ops over store.
"""

__version__ = "0.1.0"
