"""Quantization backends, one subpackage each: fp8 (scaled e4m3 weights, fp8 attention) and gguf (blocks, the
linear layer, the writer, the Triton kernels).
"""
