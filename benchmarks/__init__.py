"""aecore's benchmarks (installed as ``aecore_benchmarks``; run as ``aecore bench ...``):
``kernels`` (fused kernels vs the reference, torch.compile, a floor and scikit-learn)
and ``runtime`` (``aecore bench onnx``: onnxruntime through aecore.runtime vs PyTorch)."""
