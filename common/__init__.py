"""What dispatchd and dispatch-agent share: the trio view of a gRPC stream, layered settings,
logging set-up and clocks. Nothing here knows about tasks or hosts."""
