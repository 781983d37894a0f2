"""Triton kernels for the worker's fast paths; each has a CPU-runnable test under TRITON_INTERPRET=1."""
