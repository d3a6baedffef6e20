"""mxconv: DeepSeek V3 checkpoints -> bit-exact MXFP8 checkpoints for SGLang on Blackwell."""

__version__ = "0.1.0"

from .pipeline import convert  # noqa: E402  (the Python API: converter.convert(src, dst, ...))

__all__ = ["__version__", "convert"]
