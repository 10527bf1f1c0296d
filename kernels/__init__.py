"""Triton kernels for TinyNet, installed as `trm_fast.kernels`. Each op lives in its own file."""
