"""The network edge below the transports: :mod:`raafd.net.listener` (the one public port, each
connection routed by its first request head), :mod:`raafd.net.h1` (HTTP/1.1 request heads and
response framing, no I/O) and :mod:`raafd.net.delivery` (one delivery for every feed and every
transport)."""
