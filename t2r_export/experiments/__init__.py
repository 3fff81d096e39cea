"""Reproducible experiments built from the library's parts (one module per experiment)."""
