"""Calls into kernels below PyTorch: bitsandbytes' CUDA library through ctypes, and the pack's Triton dequantizer."""
