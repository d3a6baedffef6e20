"""Map names: the rule tables of `mappings/*.yaml` that turn a source's tensor names (Megatron-core,
DeepSeek inference, ...) into the canonical Hugging Face names, and back.
"""
