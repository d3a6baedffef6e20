"""Read: turn files on disk into named tensors with shapes and dtypes, read lazily by offset
(safetensors directories today), and the source hash recorded in the provenance.
"""
