"""What the consumer checks (load_check.py, hf_check.py) share: reading a checkpoint's tensors
with safetensors, comparing tensors byte for byte, and reporting. Imported from the scripts'
own folder (Python puts it first on sys.path when they run)."""
from __future__ import annotations

import json
import os
import sys


def read_file_tensors(ckpt):
    """Every tensor of the checkpoint in `ckpt`, by name, as safetensors reads it."""
    from safetensors import safe_open

    idx = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        with safe_open(os.path.join(ckpt, f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def u8(t):
    import torch

    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def same_bytes(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(u8(a), u8(b))


def emit(report: dict, out_json: str | None) -> int:
    """Print the report (and write it to `out_json`); the exit status: 0 passed, 1 a check failed."""
    out = json.dumps(report, indent=1, default=str)
    print(out)
    if out_json:
        with open(out_json, "w") as f:
            f.write(out)
    return 0 if report["ok"] else 1


def run(main) -> None:
    """Exit with main()'s status, or 2 (with the traceback) when the load itself failed."""
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.exit(2)
