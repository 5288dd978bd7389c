"""Evals: reconstruction, sparsity, downstream-loss and geometry metrics, and HTML reports."""
