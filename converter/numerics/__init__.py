"""Transform: the numerics as pure functions of tensors. `reference` is the specification every other
module here depends on (never the other way round); `kernels` (torch) and `native` (C) are fast
paths that give its bytes; `dispatch` picks the fastest; `trtllm_layout` is the MoE pre-shuffle.
"""
