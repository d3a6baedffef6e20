#!/usr/bin/env python3
"""Load an mxconv MXFP8 output with transformers' own `mxfp8` support and check it.

Run by tests/test_sglang_loader.py in the consumers' environment (transformers 5.x with its
`mxfp8` quant_method, accelerate), one check per process. Not part of the `converter` package;
imports `converter` (the repository root is put on sys.path) for the project's own dequantization
and its own dequantized model.

usage: python hf_check.py CKPT_DIR [--json OUT.json]

1. `AutoModelForCausalLM.from_pretrained(CKPT_DIR, dtype=float32)`: transformers reads
   quantization_config (quant_method "mxfp8", modules_to_not_convert) and, with no GPU,
   dequantizes every MXFP8 weight on load. Every weight of the loaded model must equal, byte for
   byte, the project's dequantization of the file (converter.numerics.reference
   .dequantize_mxfp8), routed experts fused as transformers stores them (gate_up_proj =
   [gate; up], down_proj), and every BF16 tensor its file bytes (upcast).
2. Logits: the project's own dequantized model (what `mxconv verify --logits` runs:
   converter.verify.logits fills a model built from the config with the dequantized DST) and
   the loaded model give identical logits, exactly: same module code, same float32 dtype and
   value-identical weights (an MXFP8 value fp8 * 2^k is exact in BF16 and in float32).
The MTP layer is not a transformers module: its tensors are reported unexpected and skipped.
Exit status 0 = all passed; 1 = a check failed; 2 = the load itself failed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from common import emit, read_file_tensors, run, same_bytes  # noqa: E402 (this folder: see common.py)


def main() -> int:
    t0 = time.perf_counter()
    ckpt = os.path.abspath(sys.argv[1])
    out_json = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from converter.numerics.reference import dequantize_mxfp8
    from converter.verify.checks import read_destination
    from converter.verify.logits import _ModelFiller, destination_tensors, fixed_token_ids

    files = read_file_tensors(ckpt)

    def ours(module: str) -> torch.Tensor:
        w = files[module + ".weight"]
        s = files.get(module + ".weight_scale_inv", files.get(module + ".weight_scale"))
        return (w if s is None else dequantize_mxfp8(w, s, torch.float32)).to(torch.float32)

    model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    model.eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    report = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "architecture": type(model).__name__,
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys_outside_mtp": sorted(
            k for k in info.get("unexpected_keys", []) if not k.startswith(f"model.layers.{n_layers}.")),
        "mismatched_keys": [str(k) for k in info.get("mismatched_keys", [])],
        "failures": [],
    }
    fail = report["failures"].append
    for key in ("missing_keys", "unexpected_keys_outside_mtp", "mismatched_keys"):
        if report[key]:
            fail(f"{key}: {report[key][:6]}")

    checked = 0
    for name, p in model.state_dict().items():
        p = p.detach()
        if ".mlp.experts.gate_up_proj" in name or ".mlp.experts.down_proj" in name:
            base = name.rsplit(".", 1)[0]
            if name.endswith("gate_up_proj"):
                ref = torch.stack([torch.cat([ours(f"{base}.{e}.gate_proj"), ours(f"{base}.{e}.up_proj")])
                                   for e in range(p.shape[0])])
            else:
                ref = torch.stack([ours(f"{base}.{e}.down_proj") for e in range(p.shape[0])])
        elif name.endswith(".weight") and name in files:
            ref = ours(name[: -len(".weight")])
        elif name in files:
            ref = files[name].to(torch.float32)
        else:
            continue
        checked += 1
        if p.dtype == torch.float8_e4m3fn:
            fail(f"{name} still float8 after loading (no CPU dequantization?)")
        elif not same_bytes(p, ref):
            fail(f"{name}: transformers' value {p.dtype} {tuple(p.shape)} differs from the project's "
                 f"dequantization {ref.dtype} {tuple(ref.shape)}")
    report["tensors_checked"] = checked
    if checked == 0:
        fail("no weight of the loaded model was matched to the file")

    # The project's own dequantized model: built from the same config, filled by
    # converter.verify.logits from the DST files (the path `mxconv verify --logits` takes).
    failures: list = []
    dest = read_destination(Path(ckpt), failures)
    if failures:
        fail(f"converter cannot read DST: {failures[0]}")
    plain = {k: v for k, v in json.load(open(os.path.join(ckpt, "config.json"))).items()
             if k not in ("quantization_config", "torch_dtype", "dtype")}
    ref_config = AutoConfig.for_model(**plain)
    ref_config._attn_implementation = model.config._attn_implementation
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(ref_config, dtype=torch.float32).eval()
    if any(n.endswith(".weight_scale") for n in files):
        # Scales under vLLM's name: the project's reader knows only `weight_scale_inv`; fill the
        # same model with the project's dequantization of each file weight instead.
        tensors = ((n, (lambda n=n: ours(n[: -len(".weight")])) if n.endswith(".weight") else (lambda n=n: files[n]))
                   for n in files if not n.endswith(".weight_scale"))
        report["reference_fill"] = "converter.numerics.reference.dequantize_mxfp8 of the file (weight_scale names)"
    else:
        tensors = destination_tensors(dest)
        report["reference_fill"] = "converter.verify.logits.destination_tensors (what verify --logits uses)"
    _ModelFiller(ref_model, n_layers).fill(tensors, "DST")
    tokens = fixed_token_ids(int(cfg.vocab_size))
    with torch.no_grad():
        want = ref_model(tokens, use_cache=False).logits
        try:
            got = model(tokens, use_cache=False).logits
        except RuntimeError as e:  # e.g. weights left in float8
            fail(f"the loaded model cannot run: {e}")
            got = torch.full_like(want, float("nan"))
    report["attn_implementation"] = model.config._attn_implementation
    report["logits_shape"] = list(got.shape)
    report["logits_identical"] = bool(same_bytes(got, want))
    report["logits_max_abs_diff"] = float((got - want).abs().max())
    if not report["logits_identical"]:
        fail(f"logits differ from the project's dequantized model (max abs diff {report['logits_max_abs_diff']})")
    report["total_s"] = round(time.perf_counter() - t0, 2)
    report["ok"] = not report["failures"]
    return emit(report, out_json)


if __name__ == "__main__":
    run(main)
