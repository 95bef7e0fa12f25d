"""The actors: each owns one kind of work, rebuilds it from the store when it starts, and is
woken by a doorbell after a commit that concerns it (the store is the truth, channels ring)."""
