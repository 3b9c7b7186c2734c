"""Triton kernels for the training step, with pure-PyTorch CPU fallbacks."""
