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


@pytest.fixture(scope="session")
def dcp_sources(tmp_path_factory):
    """DCP training checkpoints written by torch.distributed.checkpoint with 2 gloo ranks (built
    once per session, ~5-15 s), and the HF checkpoint holding the same weights: {"hf", "megatron",
    "fsdp", "hf_dcp" (HuggingFaceStorageWriter, distributed: safetensors with DCP_SHARDING_INFO),
    "torchtitan" (torchtitan's DeepSeek V3 names, experts sharded over the ranks)}. The HF one is the tiny BF16 model with the MTP layer's embed_tokens and
    shared_head.head equal to the main model's (Megatron stores them once). Tests must not modify them."""
    import json
    import shutil

    from converter.models.dcp_demo import build_dcp_checkpoints, load_hf
    from converter.models.demo import write_sharded

    root = tmp_path_factory.mktemp("dcp")
    src = build_checkpoint(root / "hf0", precision="bf16", seed=11)
    hf = load_hf(src)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    hf[f"model.layers.{n}.embed_tokens.weight"] = hf["model.embed_tokens.weight"].clone()
    hf[f"model.layers.{n}.shared_head.head.weight"] = hf["lm_head.weight"].clone()
    (root / "hf").mkdir()
    write_sharded(root / "hf", hf, 3, True)
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, root / "hf" / f.name)
    build_dcp_checkpoints(root / "hf", [{"kind": "megatron", "padded_vocab": 640, "dst": root / "megatron"},
                                        {"kind": "fsdp", "prefix": "model_state.model.", "dst": root / "fsdp"},
                                        {"kind": "hf-dcp", "prefix": "model.", "dst": root / "hf_dcp"},
                                        {"kind": "torchtitan", "dst": root / "torchtitan"}])
    return {"hf": root / "hf", "megatron": root / "megatron", "fsdp": root / "fsdp", "hf_dcp": root / "hf_dcp",
            "torchtitan": root / "torchtitan"}


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    """A fast-path test runs twice: on the compiled kernels and on the torch ones (what CUDA
    tensors and machines without a C compiler use)."""
    from converter.numerics import kernels, native

    if request.param == "torch":
        monkeypatch.setattr(kernels, "_native", lambda device: None)
    elif native._compiler() is None:
        pytest.skip("no C compiler here: mxconv uses the torch kernels")
    else:
        assert native.load() is not None, "the compiled kernels did not build"
    return request.param
