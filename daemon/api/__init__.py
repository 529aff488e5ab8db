"""The HTTP API and the web console: routes, request and answer shapes, auth, live events.

Owns the Quart app and its serving (``app``, ``http_connection``), the routes (``routes``,
``admin_routes``, ``web_routes``), request parsing and shapes (``parsing``, ``schemas``,
``admin_schemas``, ``responses``), tokens and roles (``auth``) and the SSE stream (``sse``).

May import: ``daemon.engine``, ``daemon.store``, ``daemon.ops`` and the shared vocabulary; never
``daemon.agents``.
"""
