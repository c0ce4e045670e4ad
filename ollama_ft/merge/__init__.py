"""The merge stage: the adapter merged into the full-precision base (runs/<run>/merged/)."""
