#!/usr/bin/env python3
"""Load an mxconv MXFP8 output with SGLang's own loader on CPU and check it byte for byte.

Run by tests/test_sglang_loader.py, in SGLang's own environment (not the project's: SGLang is
installed there with --no-deps next to a CPU torch; see .ci/run), one check per process
(SGLang keeps global state and a gloo group). This file is not part of the `converter` package
and the package never imports it; it imports `converter` (the repository root is put on
sys.path) only for the project's own MXFP8 dequantization.

usage: python load_check.py CKPT_DIR [--draft] [--json OUT.json]

  --draft   build the MTP draft (DeepseekV3ForCausalLMNextN) the way SGLang does for
            speculative decoding (ModelConfig(is_draft_model=True)).

Nothing in the checkpoint's config is overridden: it is loaded exactly as written.

Checks (each failure is listed in the JSON report):
  - every SGLang parameter that has a source in the file equals the file's bytes (uint8 views;
    fused q_a+kv_a, qkv, gate_up and the experts' w13 = [gate; up] / w2 rebuilt from the file);
  - no file tensor is left unused (the target model skips the MTP layer, the draft model loads
    only it, as SGLang does);
  - every BF16 kv_b_proj arrives in an unquantized layer and post_load_weights splits it into
    w_kc / w_vc bit-exact;
  - SGLang's own MXFP8 dequantization (dequant_mxfp8_2d_to_bf16) of every loaded MXFP8 weight
    equals the project's (converter.numerics.reference.dequantize_mxfp8) byte for byte.

What is stubbed (and nothing else; none of it is on the weight-loading path):
  triton       SGLang's own stand-in, sglang/_platform_stubs.py install_platform_stubs(), called
               with its macOS/MPS gate lifted (sglang/srt/utils/common.py imports triton at
               top level; there is no triton for a CPU torch).
  torchvision  SGLang's _MockModule catch-all, only for `import torchvision.*` in multimodal
               config modules (the PyPI wheels do not import against CPU torch); transformers
               is made to cache "torchvision unavailable" first.
  sgl_kernel   a module with the eight *_cpu op names imported under `if _is_cpu:` (KV-cache
               and speculative-decoding helpers); each raises if called.
  torch.cuda.get_device_capability -> (10, 0), only during publish(ServerArgs) and only for
               DSA (V3.2) configs: arg_groups/model_hook.py calls it for every non-NPU/XPU device.
Skipped step: process_weights_after_loading of FusedMoE layers (MXFP8 MoE needs SM100/gfx95);
it runs for every other layer.
Exit status 0 = all checks passed; 1 = a check failed; 2 = the load itself failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import socket
import sys
import time
import types

T0 = time.perf_counter()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from common import emit, read_file_tensors, run, same_bytes  # noqa: E402 (this folder: see common.py)

# sgl_kernel CPU ops that sglang imports at module level under `if _is_cpu:` (CPU engine)
# and never calls while loading weights.  No CPU sgl_kernel wheel exists on PyPI.
SGL_KERNEL_CPU_NAMES = [
    "copy_all_layer_kv_cache_cpu",  # mem_cache/memory_pool.py (KV-cache copy)
    "assign_req_to_token_pool_cpu",  # speculative / model_executor helpers
    "build_tree_kernel_efficient_cpu",  # speculative/eagle_utils (tree building)
    "verify_tree_greedy_cpu",  # speculative verification
    "assign_draft_cache_locs_contiguous_cpu",  # speculative draft KV locations
    "assign_extend_cache_locs_cpu",  # speculative extend KV locations
    "fill_accept_out_cache_loc_cpu",  # speculative accept
    "fill_bonus_tokens_cpu",  # speculative bonus tokens
]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def install_stubs() -> list[str]:
    """Install only what must be stubbed; return a description of each stub."""
    installed = []
    # 1. triton: sglang/srt/utils/common.py imports triton at top level; there is no triton
    #    for CPU torch.  Use SGLang's own stand-in (sglang/_platform_stubs.py), which only
    #    activates on macOS arm64 with MPS: load the file by path (importing the sglang
    #    package would run sglang/__init__.py first) and lift its platform gate for the call.
    if importlib.util.find_spec("triton") is None:
        pkg = importlib.util.find_spec("sglang")
        path = os.path.join(pkg.submodule_search_locations[0], "_platform_stubs.py")
        spec = importlib.util.spec_from_file_location("_sglang_platform_stubs", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses need the module registered
        spec.loader.exec_module(mod)
        import torch

        saved = (sys.platform, platform.machine, torch.backends.mps.is_available)
        try:
            sys.platform = "darwin"
            platform.machine = lambda: "arm64"
            torch.backends.mps.is_available = lambda: True
            mod.install_platform_stubs()
        finally:
            sys.platform, platform.machine, torch.backends.mps.is_available = saved
        # install_platform_stubs also adds missing torch.mps attributes (Stream, ...) and
        # wraps Tensor.to / Tensor.copy_ to drop non_blocking for *mps* targets only:
        # no effect on CPU tensors.
        installed.append("triton -> sglang._platform_stubs.install_platform_stubs()")
    # 2. torchvision: sglang/srt/configs/__init__.py imports every config module, and the
    #    multimodal ones (nano_nemotron_vl -> multimodal/internvl_utils.py, deepseek_ocr.py)
    #    import torchvision.transforms at module level.  The PyPI torchvision wheels do not
    #    import against the CPU torch build ("operator torchvision::nms does not exist") and
    #    nothing multimodal runs here, so a catch-all mock (SGLang's own _MockModule, the
    #    class its triton stand-in uses) serves `import torchvision.*`.
    if importlib.util.find_spec("torchvision") is None:
        # transformers must keep seeing "no torchvision" (it caches the answer with
        # lru_cache; if it saw the mock it would use it for image processing).
        from transformers.utils import import_utils as _tf_iu

        assert not _tf_iu.is_torchvision_available()
        stubs = sys.modules.get("_sglang_platform_stubs")
        if stubs is None:
            pkg = importlib.util.find_spec("sglang")
            path = os.path.join(pkg.submodule_search_locations[0], "_platform_stubs.py")
            spec = importlib.util.spec_from_file_location("_sglang_platform_stubs", path)
            stubs = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = stubs
            spec.loader.exec_module(stubs)

        class _TVFinder:
            def find_spec(self, fullname, path=None, target=None):
                if fullname == "torchvision" or fullname.startswith("torchvision."):
                    if fullname not in sys.modules:
                        m = stubs._MockModule(fullname)
                        sys.modules[fullname] = m
                        parent, _, child = fullname.rpartition(".")
                        if parent in sys.modules:
                            setattr(sys.modules[parent], child, m)
                    return sys.modules[fullname].__spec__
                return None

        sys.meta_path.insert(0, _TVFinder())
        installed.append("torchvision -> catch-all _MockModule (multimodal config imports only)")
    # 3. sgl_kernel: no CPU build on PyPI; sglang imports eight CPU op names at module level
    #    when SGLANG_USE_CPU_ENGINE=1.  Any call raises.
    if importlib.util.find_spec("sgl_kernel") is None:
        sk = types.ModuleType("sgl_kernel")
        sk.__path__ = []

        def _make(name):
            def _fn(*a, **k):
                raise RuntimeError(f"sgl_kernel.{name} stub called (load-only harness)")

            _fn.__name__ = name
            return _fn

        for n in SGL_KERNEL_CPU_NAMES:
            setattr(sk, n, _make(n))
        sys.modules["sgl_kernel"] = sk
        installed.append("sgl_kernel: " + ", ".join(SGL_KERNEL_CPU_NAMES))
    return installed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--draft", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    ckpt = os.path.abspath(args.ckpt)

    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)

    report = {"ckpt": ckpt, "draft": args.draft, "stubs": install_stubs(), "failures": []}
    fail = report["failures"].append

    import torch

    t_import = time.perf_counter()
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.layers.quantization.mxfp8_block_convert import dequant_mxfp8_2d_to_bf16
    from sglang.srt.model_loader.loader import (
        DefaultModelLoader,
        _get_quantization_config,
        _initialize_model,
    )
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    report["import_s"] = round(time.perf_counter() - t_import, 2)

    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    load_dir = ckpt

    # Global state, as sglang/test/layer_ut_utils.py + test_utils.publish_build_topology.
    t_setup = time.perf_counter()
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    server_args = ServerArgs(model_path=load_dir, device="cpu")
    reset_context()
    if "index_topk" in cfg:
        # DeepSeek V3.2 (DSA): arg_groups/model_hook.py handle_model_specific_adjustments treats
        # every non-NPU/XPU platform as a CUDA GPU and calls torch.cuda.get_device_capability(),
        # which raises on a CPU torch build.  Answer it during server-args resolution only.
        _gdc = torch.cuda.get_device_capability
        torch.cuda.get_device_capability = lambda *a, **k: (10, 0)
        report["stubs"].append("torch.cuda.get_device_capability -> (10, 0) during publish(ServerArgs) (DSA model_hook)")
        try:
            publish(server_args, role="test", ranks=SpawnRanks(world_rank=0))
        finally:
            torch.cuda.get_device_capability = _gdc
    else:
        publish(server_args, role="test", ranks=SpawnRanks(world_rank=0))
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import get_parallel

    if parallel_state._WORLD is not None:
        get_parallel().override_permanently(world_group=parallel_state._WORLD)
    initialize_model_parallel(backend="gloo")

    model_config = ModelConfig.from_server_args(server_args, is_draft_model=args.draft)
    load_config = LoadConfig(load_format="auto")
    report["architecture"] = model_config.hf_config.architectures[0]
    report["setup_s"] = round(time.perf_counter() - t_setup, 2)

    # Build the model exactly as DefaultModelLoader.load_model does.
    t_build = time.perf_counter()
    quant_config = _get_quantization_config(model_config, load_config)
    report["quant_config"] = type(quant_config).__name__ + f"({quant_config.get_name()})"
    report["ignored_layers"] = list(getattr(quant_config, "ignored_layers", []))
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
        model = _initialize_model(model_config, load_config, quant_config)
    report["build_s"] = round(time.perf_counter() - t_build, 2)

    # Weight iterator (records what the file yields) + load_weights (runs post_load_weights).
    t_load = time.perf_counter()
    loader = DefaultModelLoader(load_config)
    yielded = []

    def tap(it):
        for name, t in it:
            yielded.append(name)
            yield name, t

    missing_msgs = []

    class _Catch(logging.Handler):
        def emit(self, rec):
            msg = rec.getMessage()
            if "not found in params_dict" in msg or "skip" in msg.lower() and "weight" in msg.lower():
                missing_msgs.append(msg)

    logging.getLogger("sglang").addHandler(_Catch())
    DefaultModelLoader.load_weights_only(
        model, tap(loader._get_all_weights(model_config, model)), torch.device("cpu")
    )
    report["load_s"] = round(time.perf_counter() - t_load, 2)
    report["yielded"] = len(yielded)
    report["loader_messages"] = missing_msgs[:20]

    # ---- checks -------------------------------------------------------------------------
    t_check = time.perf_counter()
    files = read_file_tensors(ckpt)
    # Scales named `weight_scale` (vLLM's name): SGLang renames them to `weight_scale_inv` on
    # file loads; compare under SGLang's name.
    renamed = [n for n in files if n.endswith(".weight_scale")]
    for n in renamed:
        files[n + "_inv"] = files.pop(n)
    report["scales_named_weight_scale"] = len(renamed)
    consumed = set()
    params = dict(model.named_parameters())
    n_layers = model_config.hf_config.num_hidden_layers

    def file_name(sg_name: str) -> str:
        """SGLang parameter name -> checkpoint name (non-fused)."""
        if args.draft:
            mtp = f"model.layers.{n_layers}."
            if sg_name.startswith("model.decoder."):
                return mtp + sg_name[len("model.decoder.") :]
            if sg_name == "lm_head.weight":
                return mtp + "shared_head.head.weight"
            if sg_name.startswith("model."):
                return mtp + sg_name[len("model.") :]
        return sg_name

    def expect(sg_name, parts, dim=0):
        """parts: list of file names concatenated along dim."""
        ts = []
        for p in parts:
            if p not in files:
                return None
            ts.append(files[p])
            consumed.add(p)
        return ts[0] if len(ts) == 1 else torch.cat(ts, dim)

    checked, nosource, kinds = 0, [], {}
    from_target = {}
    if args.draft:
        # deepseek_weight_loader.py skips the MTP layer's embed_tokens and shared_head.head
        # ("Use shared head and embed weights from target model"); the speculative worker
        # hands the draft the target's embedding and lm_head at run time.
        mtp = f"model.layers.{n_layers}."
        for sg, own, tgt in (
            ("model.embed_tokens.weight", mtp + "embed_tokens.weight", "model.embed_tokens.weight"),
            ("lm_head.weight", mtp + "shared_head.head.weight", "lm_head.weight"),
        ):
            consumed.add(own)
            from_target[own] = bool(
                own in files and tgt in files and same_bytes(files[own], files[tgt])
            )
        report["draft_skipped_by_sglang_equal_to_target"] = from_target
    for name, p in params.items():
        if args.draft and name in ("model.embed_tokens.weight", "lm_head.weight"):
            nosource.append(name + " (from target)")
            continue
        fn = file_name(name)
        exp = None
        if ".fused_qkv_a_proj_with_mqa." in fn:
            suf = fn.split(".fused_qkv_a_proj_with_mqa.")[1]
            base = fn.split(".fused_qkv_a_proj_with_mqa.")[0]
            exp = expect(name, [f"{base}.q_a_proj.{suf}", f"{base}.kv_a_proj_with_mqa.{suf}"])
            kind = "fused q_a+kv_a"
        elif ".qkv_proj." in fn:  # Qwen-style fused QKV = [q; k; v]
            base, suf = fn.split(".qkv_proj.")
            exp = expect(name, [f"{base}.{x}_proj.{suf}" for x in "qkv"])
            kind = "qkv=[q;k;v]"
        elif ".gate_up_proj." in fn:
            base, suf = fn.split(".gate_up_proj.")
            exp = expect(name, [f"{base}.gate_proj.{suf}", f"{base}.up_proj.{suf}"])
            kind = "gate_up=[gate;up]"
        elif ".mlp.experts.w13_" in fn or ".mlp.experts.w2_" in fn:
            base, suf = fn.split(".mlp.experts.")
            w, rest = suf.split("_", 1)  # "w13", "weight" / "weight_scale_inv"
            E = p.shape[0]
            per = []
            for e in range(E):
                eb = f"{base}.mlp.experts.{e}"
                n_routed = getattr(model_config.hf_config, "n_routed_experts", None) or model_config.hf_config.num_experts
                if e >= n_routed:  # fused shared expert
                    eb = f"{base}.mlp.shared_experts"
                if w == "w13":
                    t = expect(name, [f"{eb}.gate_proj.{rest}", f"{eb}.up_proj.{rest}"])
                else:
                    t = expect(name, [f"{eb}.down_proj.{rest}"])
                per.append(t)
            exp = None if any(t is None for t in per) else torch.stack(per)
            kind = f"experts {w}"
        else:
            exp = expect(name, [fn])
            kind = "direct"
        if exp is None:
            nosource.append(name)
            continue
        checked += 1
        kinds[kind] = kinds.get(kind, 0) + 1
        if not same_bytes(p.data, exp):
            fail(
                f"bytes differ: {name} ({p.dtype} {tuple(p.shape)}) vs file "
                f"({exp.dtype} {tuple(exp.shape)}) [{kind}]"
            )
    report["params_checked"] = checked
    if checked == 0:
        fail("no SGLang parameter was matched to a file tensor")
    report["param_kinds"] = kinds
    report["params_without_source"] = nosource
    unconsumed = sorted(set(files) - consumed)
    mtp_prefix = f"model.layers.{n_layers}."
    if args.draft:  # the draft loads only the MTP layer
        unconsumed = [n for n in unconsumed if n.startswith(mtp_prefix)]
    else:  # the target skips layers >= num_hidden_layers (the MTP layer) by design
        report["file_tensors_mtp_skipped_by_target"] = sum(n.startswith(mtp_prefix) for n in unconsumed)
        unconsumed = [n for n in unconsumed if not n.startswith(mtp_prefix)]
    report["file_tensors"] = len(files)
    report["file_tensors_unconsumed"] = unconsumed
    if unconsumed:
        fail(f"{len(unconsumed)} file tensors not loaded into any parameter: {unconsumed[:8]}")

    # kv_b_proj: unquantized layer, and w_kc / w_vc = exact split of the BF16 file tensor.
    kvb = {}
    for mname, mod in model.named_modules():
        if mname.endswith("self_attn") and hasattr(mod, "kv_b_proj"):
            layer = mod.kv_b_proj
            qm = type(getattr(layer, "quant_method", None)).__name__
            w = layer.weight
            fname = file_name(mname + ".kv_b_proj.weight")
            src = files.get(fname)
            entry = {"quant_method": qm, "weight_dtype": str(w.dtype)}
            if src is None:
                fail(f"{fname} not in file")
            else:
                h = mod.num_local_heads
                nope, vd, r = mod.qk_nope_head_dim, mod.v_head_dim, mod.kv_lora_rank
                v = src.view(h, nope + vd, r)
                w_kc_ref = v[:, :nope, :]
                w_vc_ref = v[:, nope:, :].transpose(1, 2)
                ok_kc = isinstance(mod.w_kc, torch.Tensor) and same_bytes(mod.w_kc, w_kc_ref)
                ok_vc = isinstance(mod.w_vc, torch.Tensor) and same_bytes(mod.w_vc, w_vc_ref)
                entry.update(
                    w_kc=f"{getattr(mod.w_kc, 'dtype', None)} {tuple(getattr(mod.w_kc, 'shape', ()))}",
                    w_vc=f"{getattr(mod.w_vc, 'dtype', None)} {tuple(getattr(mod.w_vc, 'shape', ()))}",
                    w_kc_exact=bool(ok_kc),
                    w_vc_exact=bool(ok_vc),
                )
                if not (ok_kc and ok_vc and "Unquantized" in qm):
                    fail(f"kv_b_proj {mname}: {entry}")
            kvb[mname] = entry
    report["kv_b_proj"] = kvb
    # DSA (V3.2) indexer: which linears SGLang built quantized, and the param dtypes.
    idx_info = {}
    for mname, mod in model.named_modules():
        if ".indexer." in mname + "." and mname.split(".")[-1] in ("wq_b", "wk", "weights_proj", "wk_weights_proj", "k_norm"):
            key = ".".join(mname.split(".")[-2:])
            if key in idx_info:
                continue
            idx_info[key] = {
                "class": type(mod).__name__,
                "quant_method": type(getattr(mod, "quant_method", None)).__name__,
                "params": {n: f"{t.dtype} {tuple(t.shape)}" for n, t in mod.named_parameters()},
            }
    if idx_info:
        report["indexer_modules"] = idx_info

    # SGLang's own MXFP8 dequant (layers/quantization/mxfp8_block_convert.py
    # dequant_mxfp8_2d_to_bf16) of every loaded MXFP8 weight == the project's
    # (converter.numerics.reference.dequantize_mxfp8, the specification) to BF16.
    from converter.numerics.reference import dequantize_mxfp8

    n_deq = 0
    for name, p in params.items():
        if not name.endswith("weight_scale_inv"):
            continue
        wname = name[: -len("_scale_inv")]
        w, s = params[wname].data, p.data
        if w.dtype != torch.float8_e4m3fn or s.dtype != torch.uint8:
            fail(f"{wname}: weight {w.dtype} scale {s.dtype} (want float8_e4m3fn + uint8)")
            continue
        ws = [(w, s)] if w.dim() == 2 else [(w[e], s[e]) for e in range(w.shape[0])]
        for wi, si in ws:
            got = dequant_mxfp8_2d_to_bf16(wi, si)
            ours = dequantize_mxfp8(wi, si, torch.bfloat16)
            n_deq += 1
            if not same_bytes(got, ours):
                fail(f"SGLang's MXFP8 dequantization of {wname} differs from converter's")
    report["dequant_checked"] = n_deq
    if n_deq == 0:
        fail("no MXFP8 weight found to dequantize")

    # process_weights_after_loading for everything except FusedMoE (raises on CPU:
    # "MXFP8 MoE quantization requires SM100 or ROCm gfx95").
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.model_loader.loader import _modules_with_quant_method

    before = {n: p.data.clone() for n, p in params.items()}
    n_pw, skipped = 0, 0
    for module, qm in _modules_with_quant_method(model):
        if isinstance(module, FusedMoE):
            skipped += 1
            continue
        qm.process_weights_after_loading(module)
        n_pw += 1
    after = dict(model.named_parameters())
    changed = sorted(
        n for n, t in before.items() if n not in after or not same_bytes(after[n].data, t)
    )
    report["process_weights_after_loading"] = {
        "ran": n_pw,
        "skipped_fusedmoe": skipped,
        "params_changed_or_replaced": changed,  # informational
    }
    report["check_s"] = round(time.perf_counter() - t_check, 2)
    report["total_s"] = round(time.perf_counter() - T0, 2)
    report["ok"] = not report["failures"]
    return emit(report, args.json)


if __name__ == "__main__":
    run(main)
