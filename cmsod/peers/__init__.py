"""Clients of the outside world (orchestrator, ticket system, event sinks) and their loop-back
twins. A peer returns answers; the actor that called it records them in the store."""
