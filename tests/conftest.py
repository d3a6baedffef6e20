import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from converter.models.demo import build_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """Tiny DeepSeek V3 checkpoints (3 shards, partners split across shards, dense + MoE + MTP)
    in each source precision, built once per test session. Tests must not modify them."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "bf16": build_checkpoint(root / "bf16", precision="bf16", seed=1),
        "fp8": build_checkpoint(root / "fp8", precision="fp8", seed=2),
        "fp8_ue8m0": build_checkpoint(root / "ue8m0", precision="fp8_ue8m0", seed=3),
        "fp8_ue8m0_u8": build_checkpoint(root / "ue8m0_u8", precision="fp8_ue8m0", seed=4, ue8m0_as_uint8=True),
    }
