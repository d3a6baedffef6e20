"""Names of the files mxconv writes into a destination checkpoint, in one place."""

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Provenance: written last of all, so its presence marks a complete conversion.
PROVENANCE_FILE = "mxconv.json"
# Written by `mxconv verify` into the destination it checked.
VERIFY_REPORT_FILE = "mxconv_verify.json"
# Resume state (manifest, temporary shards); never uploaded.
STATE_DIR = ".mxconv"
MANIFEST_FILE = "manifest.json"


def shard_name(index: int, count: int) -> str:
    """Standard Hugging Face shard name, 1-based."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"
