"""Sparse autoencoders for interpretability: sparsity rules, the training recipe, metrics and interchange formats."""
