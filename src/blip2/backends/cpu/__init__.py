"""The CPU backend: C kernels, packed layouts, weight-only quantization."""
