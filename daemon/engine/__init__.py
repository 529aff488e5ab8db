"""The work: tasks become executions on hosts, under limits and timers, to a recorded end.

Owns the task use cases (``tasks``: create, start, cancel, retry), the queue (``scheduler``),
running a task (``dispatcher``) and following each execution (``executions``: every daemon-side
timeout), hosts' enrolment decisions (``hosts``), and what it needs from connected agents, as a
shape (``fleet``).

May import: ``daemon.store`` and ``daemon.ops``, and the shared vocabulary; never
``daemon.agents`` or ``daemon.api`` (the server hands it the agents' registry as a ``Fleet``).
"""
