"""The transformer's fast paths: regional compilation, fused attention projections, CUDA-graph steps."""
