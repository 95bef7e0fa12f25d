"""Clients of the outside world (orchestrator, ticket system, event sinks) and their loop-back
twins. A peer returns answers; the actor that called it records them in the store."""


def excerpt(body: bytes, limit: int = 500) -> str:
    """The start of a peer's answer, for a message that says what it sent back."""
    text = body[:limit].decode("utf-8", "replace")
    return text + ("..." if len(body) > limit else "")
