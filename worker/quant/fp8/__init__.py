"""The fp8 level: e4m3 weights with per-channel scales, fp8 tensor-core matmuls, cuDNN's fp8 attention, and the
Triton row-quantization kernel.
"""
