"""HTTP transport: the ASGI app served through hypercorn."""
