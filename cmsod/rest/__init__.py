"""CMSO's REST API: an ASGI adapter over the control socket's handlers, served by hypercorn."""
