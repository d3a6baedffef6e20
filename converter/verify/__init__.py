"""Verify: prove a destination is exactly what mxconv makes from its source (coverage, config,
bytes, numerics, logits), the JSON and HTML reports, and `mxconv inspect`.
"""
