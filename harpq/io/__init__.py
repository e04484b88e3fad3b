"""Model, text and checkpoint I/O."""
