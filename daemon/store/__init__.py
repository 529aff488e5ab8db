"""The record: everything the daemon knows, durably, and the one ordered way it changes.

Owns the peewee models and migrations (``models``, ``migrations``), the thread-and-limiter door
to the database (``database``), the batch writer with its ledger of unfinished executions
(``writer``, ``flush``, ``ledger``, ``write_ops``, ``agent_events``), the reads (``queries``,
``changes``, ``stats``, ``task_records``, ``host_records``, ``views``) and retention.

May import: the shared vocabulary at the top of ``daemon`` (``states``, ``errors``, ``taskspec``,
``identifiers``) and ``proto``; never ``daemon.engine``, ``daemon.agents``, ``daemon.api`` or
``daemon.ops`` (checked by the import contracts in ``pyproject.toml``).
"""
