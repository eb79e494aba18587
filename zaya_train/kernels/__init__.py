"""Compute kernels, each beside the PyTorch reference it must equal (tests/kernels)."""
