"""mxconv: DeepSeek V3/V3.2, Kimi K2 and Qwen3-MoE checkpoints (the families of families/*.yaml) ->
bit-exact MXFP8 checkpoints for SGLang on Blackwell.

`converter.convert(src, dst, ...)` is the Python API of `mxconv convert`. It is imported on first
use, so that `import converter` (and the CLI's start) does not wait for torch.
"""

from converter.version import __version__

__all__ = ["__version__", "convert"]


def __getattr__(name: str):
    if name == "convert":
        from converter.run.pipeline import convert

        return convert
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
