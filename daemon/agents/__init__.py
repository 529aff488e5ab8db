"""The agent port: gRPC streams from ``dispatch-agent``, from hello to goodbye.

Owns the grpclib server (``grpc_bridge``, with ``common.grpc_bridge`` the only asyncio code),
admitting streams (``admission``) and who may speak for a host (``identity``, ``enrollment``),
one session per stream (``session``), the registry of connected hosts (``registry``), heartbeats
and silence (``liveness``) and per-stream rate limits (``throttle``).

May import: ``daemon.engine``, ``daemon.store``, ``daemon.ops`` and the shared vocabulary; never
``daemon.api``.
"""
