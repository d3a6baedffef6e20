"""The peers `scripts/bench.py` times mxconv against, beside `cp`: llm-compressor's model-free
MXFP8 path, and the two-step route from a training checkpoint (torch's dcp_to_torch_save, an
export to Hugging Face names, then mxconv)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# llm-compressor's model-free PTQ (compressed-tensors format), run in its own interpreter: it
# pins other versions of torch/transformers than mxconv's environment may have.
LLMC_DRIVER = r"""
import sys
from llmcompressor import model_free_ptq
src, dst, precision, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# what mxconv's deepseek_v3_mxfp8 recipe keeps in BF16 (norms are skipped automatically)
ignore = ["lm_head", "re:.*embed_tokens$", "re:.*mlp\\.gate$", "re:.*kv_b_proj$", "re:.*eh_proj$",
          "re:.*shared_head.*"]
converter = None
if precision == "fp8":
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer
    converter = FP8BlockDequantizer(targets=[
        "re:.*(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)$"])
model_free_ptq(model_stub=src, save_directory=dst, scheme="MXFP8", ignore=ignore, max_workers=workers,
               device="cpu", converter=converter)
"""


# The route a user has today from a training checkpoint: torch's own dcp_to_torch_save (one
# process, the whole state dict), then an export to HF-named BF16 safetensors (the Megatron
# names mapped with mxconv's own mapping), then mxconv on that.
TWO_STEP_DRIVER = r"""
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from converter.mapping.names import load_mapping, materialize
src, work, cfg_dir = map(Path, sys.argv[1:4])
dcp_to_torch_save(src, work / "full.pt")
state = torch.load(work / "full.pt", mmap=True, weights_only=False)  # written just now, by us
config = json.loads((cfg_dir / "config.json").read_text())
weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}
plan = load_mapping("megatron").plan({k: tuple(v.shape) for k, v in weights.items()}, config["num_hidden_layers"],
                                     vocab_size=config["vocab_size"])
hf = work / "hf"
hf.mkdir()
weight_map, shard, size, n = {}, {}, 0, 0
def flush():
    global shard, size, n
    if shard:
        n += 1
        save_file(shard, str(hf / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0
for name, d in plan.items():
    shard[name] = materialize(d, weights.__getitem__)
    size += shard[name].numel() * shard[name].element_size()
    if size >= 2 << 30:
        flush()
flush()
(hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
for f in cfg_dir.iterdir():
    if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
        shutil.copy(f, hf / f.name)
"""


def find_llmc_python(explicit: str | None) -> tuple[str | None, str]:
    """An interpreter that can import llmcompressor, and why not if none."""
    candidates = [explicit] if explicit else [sys.executable, "/tmp/llmc-venv/bin/python"]
    for py in candidates:
        if py and Path(py).exists():
            r = subprocess.run([py, "-c", "import llmcompressor.entrypoints.model_free"], capture_output=True)
            if r.returncode == 0:
                return py, ""
    return None, ("llmcompressor is not importable from " + ", ".join(c for c in candidates if c)
                  + " (pip install llmcompressor, ideally in its own venv; pass --llmc-python)")
