"""Deployment targets beyond the runtime: the Triton Inference Server model repository (triton.py)."""
