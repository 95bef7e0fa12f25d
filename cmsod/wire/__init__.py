"""msgspec Structs of every external format. No I/O here."""
