"""Model families: what a family's tensors are, and tiny model-shaped checkpoints built from that
(`mxconv demo`, the tests).
"""
