"""The GGUF levels: block encoders, the Triton-dequantized linear layer and its kernels, and the GGUF writer
(`fluxfarm quantize`).
"""
