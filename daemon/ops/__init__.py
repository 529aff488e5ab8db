"""What operators of the daemon itself see: metrics and the audit log.

Owns ``/metrics`` (``metrics``, ``transition_metrics``) and the audit log (``audit``).

May import: ``daemon.store`` and the shared vocabulary; never ``daemon.engine``,
``daemon.agents`` or ``daemon.api``.
"""
