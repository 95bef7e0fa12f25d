"""Pure scheduling code: no trio, no I/O."""
