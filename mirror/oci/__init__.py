"""The registry's grammar, media types and error codes: no I/O."""
