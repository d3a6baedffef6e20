"""PyTorch DCP training checkpoints built from a Hugging Face DeepSeek V3 checkpoint, written by
`torch.distributed.checkpoint` with several gloo ranks on CPU, for tests and benchmarks.

- "megatron": Megatron-core torch_dist names and chunking, as `ShardedTensor`s (what
  megatron-core saves): column-parallel weights split along rows over the ranks (`linear_fc1`
  as Megatron's swiglu factory does it: gate and up each split, two chunks per rank),
  row-parallel ones along columns, stacked routed experts one chunk per expert per half of fc1,
  spread over the ranks (expert parallelism), norms and biases written once by rank 0, the
  vocabulary padded, a column chunk of `linear_proj` saved with transposed strides, plus
  `_extra_state`, optimizer, `rng_state` and `common_state` items that a converter must skip.
- "hf-dcp": the "fsdp" state written by `HuggingFaceStorageWriter(save_distributed=True)`:
  safetensors per rank with DCP_SHARDING_INFO offsets, no pickle.
- "fsdp": FSDP2 style, `DTensor`s sharded along dim 0 over the ranks (uneven last shard), the
  Hugging Face names under a wrapper prefix, transformers-5 fused experts
  (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), optimizer state.
- "torchtitan": torchtitan's DeepSeek V3 names at the top level (`tok_embeddings`, `layers.L.attention.wq_a`,
  ..., stacked routed experts `moe.routed_experts.inner_experts.w1_EFD` / `w3_EFD` [E, F, D] and `w2_EDF`
  [E, D, F], the MTP block under `mtp_layers.0.`, no MTP embedding or head), `DTensor`s sharded along
  dim 0 over the ranks (the experts: expert parallelism), optimizer state and a `train_state` bytes item.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_ATTN = {"q_a_proj": "linear_q_down_proj", "q_b_proj": "linear_q_up_proj", "kv_a_proj_with_mqa": "linear_kv_down_proj",
         "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def load_hf(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(root).glob("*.safetensors")):
        out.update(load_file(path))
    return out


class LazyHF:
    """The tensors of an HF checkpoint, each read when asked for (building a multi-GB DCP
    checkpoint then holds one global tensor at a time besides the rank's own chunks)."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self.files = {}
        for path in sorted(Path(root).glob("*.safetensors")):
            f = safe_open(str(path), framework="pt")
            self.files.update({name: f for name in f.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.files[name].get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self):
        return self.files.keys()


def megatron_tensors(hf, config: dict, padded_vocab: int, seed: int = 0):
    """(name, tensor) of the Hugging Face tensors under Megatron-core torch_dist names (stacked
    experts, padded vocabulary), made one at a time."""
    gen = torch.Generator().manual_seed(seed)
    n = config["num_hidden_layers"]

    def pad(t):
        extra = torch.randn(padded_vocab - t.shape[0], t.shape[1], generator=gen).to(t.dtype)
        return torch.cat([t, extra])

    yield "embedding.word_embeddings.weight", pad(hf["model.embed_tokens.weight"])
    yield "decoder.final_layernorm.weight", hf["model.norm.weight"]
    yield "output_layer.weight", pad(hf["lm_head.weight"])
    layers = n + (config.get("num_nextn_predict_layers") or 0)
    for layer in range(layers):
        out = {}
        p = f"model.layers.{layer}."
        q = f"decoder.layers.{layer}." if layer < n else f"mtp.layers.{layer - n}.transformer_layer."
        a = q + "self_attention."
        out[q + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        for hf_name, mc in _ATTN.items():
            out[a + mc + ".weight"] = hf[p + "self_attn." + hf_name + ".weight"]
        out[a + "linear_q_up_proj.layer_norm_weight"] = hf[p + "self_attn.q_a_layernorm.weight"]
        out[a + "linear_kv_up_proj.layer_norm_weight"] = hf[p + "self_attn.kv_a_layernorm.weight"]
        if p + "mlp.gate_proj.weight" in hf:  # dense
            out[q + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
            out[q + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
            out[q + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
        else:
            out[q + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[q + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
            out[q + "mlp.router.expert_bias"] = hf[p + "mlp.gate.e_score_correction_bias"]
            e = config["n_routed_experts"]
            x = p + "mlp.experts."
            out[q + "mlp.experts.experts.linear_fc1.weight"] = torch.stack(
                [torch.cat([hf[f"{x}{i}.gate_proj.weight"], hf[f"{x}{i}.up_proj.weight"]]) for i in range(e)])
            out[q + "mlp.experts.experts.linear_fc2.weight"] = torch.stack([hf[f"{x}{i}.down_proj.weight"]
                                                                            for i in range(e)])
            s = p + "mlp.shared_experts."
            out[q + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([hf[s + "gate_proj.weight"],
                                                                        hf[s + "up_proj.weight"]])
            out[q + "mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"]
        if layer >= n:
            m = f"mtp.layers.{layer - n}."
            for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
                out[m + k] = hf[p + k]
            out[m + "final_layernorm.weight"] = hf[p + "shared_head.norm.weight"]
        yield from out.items()


def fsdp_tensors(hf, config: dict, prefix: str):
    """(name, tensor) of the Hugging Face tensors under `prefix`, routed experts fused as in
    transformers 5."""
    fused = set()
    for name in list(hf.keys()):
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.", name)
        if m is None:
            yield prefix + name, hf[name]
            continue
        x = m[1]
        if x in fused:
            continue
        fused.add(x)
        e = config["n_routed_experts"]
        yield prefix + x + "gate_up_proj", torch.stack(
            [torch.cat([hf[f"{x}{i}.gate_proj.weight"], hf[f"{x}{i}.up_proj.weight"]]) for i in range(e)])
        yield prefix + x + "down_proj", torch.stack([hf[f"{x}{i}.down_proj.weight"] for i in range(e)])


_TITAN_LAYER = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attention.wq", "self_attn.q_a_proj": "attention.wq_a",
                "self_attn.q_a_layernorm": "attention.q_norm", "self_attn.q_b_proj": "attention.wq_b",
                "self_attn.kv_a_proj_with_mqa": "attention.wkv_a", "self_attn.kv_a_layernorm": "attention.kv_norm",
                "self_attn.kv_b_proj": "attention.wkv_b", "self_attn.o_proj": "attention.wo",
                "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                "mlp.down_proj": "feed_forward.w2",
                "mlp.gate": "moe.router.gate", "mlp.shared_experts.gate_proj": "moe.shared_experts.w1",
                "mlp.shared_experts.up_proj": "moe.shared_experts.w3",
                "mlp.shared_experts.down_proj": "moe.shared_experts.w2",
                "enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "mtp_norm"}
_TITAN_EXPERTS = {"gate_proj": "w1_EFD", "up_proj": "w3_EFD", "down_proj": "w2_EDF"}


def torchtitan_tensors(hf, config: dict):
    """(name, tensor) of the Hugging Face tensors under torchtitan's DeepSeek V3 names (its
    state_dict_adapter's from_hf): routed experts stacked, the MTP layer under `mtp_layers.`
    without its embedding and head (torchtitan keeps one of each)."""
    n = config["num_hidden_layers"]
    stacked = set()
    yield "tok_embeddings.weight", hf["model.embed_tokens.weight"]
    yield "norm.weight", hf["model.norm.weight"]
    yield "lm_head.weight", hf["lm_head.weight"]
    for name in list(hf.keys()):
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name) or re.match(
            r"model\.layers\.(\d+)\.(mlp\.gate)\.e_score_correction_bias$", name)
        if m is None:
            continue
        layer, rest = int(m[1]), m[2]
        q = f"layers.{layer}." if layer < n else f"mtp_layers.{layer - n}."
        if name.endswith("e_score_correction_bias"):
            yield q + "moe.expert_bias_E", hf[name]
            continue
        e = re.match(r"mlp\.experts\.(\d+)\.(\w+)$", rest)
        if e is not None:
            if (layer, e[2]) not in stacked:
                stacked.add((layer, e[2]))
                x = f"model.layers.{layer}.mlp.experts."
                yield (q + "moe.routed_experts.inner_experts." + _TITAN_EXPERTS[e[2]],
                       torch.stack([hf[f"{x}{i}.{e[2]}.weight"] for i in range(config["n_routed_experts"])]))
            continue
        if rest in ("embed_tokens", "shared_head.head"):  # the MTP layer's copies of the main ones
            continue
        yield q + _TITAN_LAYER[rest] + ".weight", hf[name]


def megatron_chunks(name: str, shape: tuple, ranks: int) -> list[tuple[tuple, tuple, int]]:
    """(offsets, sizes, rank) of each chunk, as Megatron with TP = EP = `ranks` saves them."""
    if len(shape) == 1:
        return [((0,), shape, 0)]
    if ".experts.experts.linear_fc1" in name:
        e, two_i, h = shape
        return [((k, j * two_i // 2, 0), (1, two_i // 2, h), k * ranks // e) for k in range(e) for j in (0, 1)]
    if ".experts.experts.linear_fc2" in name:
        e, h, i = shape
        return [((k, 0, 0), (1, h, i), k * ranks // e) for k in range(e)]
    rows, cols = shape
    if name.endswith(_ROW_PARALLEL):
        step = cols // ranks
        return [((0, r * step), (rows, step), r) for r in range(ranks)]
    if name.endswith("linear_fc1.weight"):  # [gate; up], each split over the ranks
        half = rows // 2
        step = half // ranks
        return [((j * half + r * step, 0), (step, cols), r) for r in range(ranks) for j in (0, 1)]
    step = -(-rows // ranks)
    return [((r * step, 0), (min(step, rows - r * step), cols), r) for r in range(ranks) if r * step < rows]


def _save_rank(rank: int, ranks: int, port: int, jobs: list) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        for job in jobs:
            make = {"megatron": _megatron_state, "torchtitan": _torchtitan_state}.get(job["kind"], _fsdp_state)
            state = make(rank, ranks, job)
            if job["kind"] == "hf-dcp":  # Hugging Face DCP: safetensors with DCP_SHARDING_INFO, per rank
                writer = dcp.HuggingFaceStorageWriter(job["dst"], save_distributed=True)
                state = {k: v for k, v in state.items() if not k.startswith("optim_state")}
            else:
                writer = dcp.FileSystemWriter(job["dst"], thread_count=1)
            dcp.save(state, storage_writer=writer)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _megatron_state(rank: int, ranks: int, job: dict) -> dict:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    config = json.loads((Path(job["hf"]) / "config.json").read_text())
    tensors = megatron_tensors(LazyHF(job["hf"]), config, job.get("padded_vocab") or config["vocab_size"])
    state: dict = {}
    for name, t in tensors:
        metas, local = [], []
        for k, (offsets, sizes, owner) in enumerate(megatron_chunks(name, tuple(t.shape), ranks)):
            meta = ShardMetadata(list(offsets), list(sizes), f"rank:{owner}/cpu")
            metas.append(meta)
            if owner == rank:
                local.append(Shard(t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone(), meta))
        gmeta = ShardedTensorMetadata(metas, t.shape, TensorProperties(dtype=t.dtype))
        state[name] = ShardedTensor._init_from_local_shards_and_global_metadata(local, gmeta)
        if name.endswith("self_attention.linear_proj.weight") and rank == 1 and job.get("transposed", True):
            # a chunk saved from a transposed view (a clone keeps its strides): readers must honour them
            shard = state[name].local_shards()[0]
            shard.tensor = shard.tensor.t().contiguous().t()
        if name.endswith("linear_fc1.weight") and rank == 0:
            state[name.replace(".weight", "._extra_state/shard_0_2")] = io.BytesIO(b"TE fp8 meta")
    if rank == 0:
        state["rng_state"] = io.BytesIO(b"rng")
        state["common_state"] = io.BytesIO(b"common")
        state["optimizer.state.exp_avg.decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(4, 4)
    return state


def _row_sharded(rank: int, ranks: int, tensors) -> dict:
    """FSDP2's layout of (name, full tensor) pairs: DTensors sharded on dim 0 over `ranks` ranks
    (a rank past the rows holds an empty shard), this rank's shard of each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (ranks,))
    state: dict = {}
    for name, t in tensors:
        parts = torch.chunk(t, ranks, dim=0)
        local = parts[rank] if rank < len(parts) else t[:0]
        state[name] = DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False, shape=t.shape,
                                         stride=t.stride())
    return state


def _fsdp_state(rank: int, ranks: int, job: dict) -> dict:
    config = json.loads((Path(job["hf"]) / "config.json").read_text())
    state = _row_sharded(rank, ranks, fsdp_tensors(LazyHF(job["hf"]), config, job.get("prefix", "model_state.model.")))
    state["optim_state.state.exp_avg"] = torch.zeros(3)
    return state


def _torchtitan_state(rank: int, ranks: int, job: dict) -> dict:
    config = json.loads((Path(job["hf"]) / "config.json").read_text())
    state = _row_sharded(rank, ranks, torchtitan_tensors(LazyHF(job["hf"]), config))
    state["optimizer.state.layers.0.attention.wo.weight.exp_avg"] = torch.zeros(3)
    state["train_state"] = io.BytesIO(b"step 100")
    return state


def build_dcp_checkpoints(hf_root: str | Path, jobs: list[dict], ranks: int = 2) -> None:
    """Write DCP checkpoints from the HF checkpoint in `hf_root`; each job: {"kind": "megatron"
    (with "padded_vocab"), "fsdp" (with "prefix"), "hf-dcp" or "torchtitan", "dst": directory}.
    One group of `ranks` gloo processes writes them all."""
    jobs = [dict(job, dst=str(job["dst"]), hf=str(hf_root)) for job in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = os.path.join(tmp, "jobs.json")
        Path(spec).write_text(json.dumps(jobs))
        procs = [subprocess.Popen([sys.executable, "-m", "converter.models.dcp_demo", spec, str(r), str(ranks),
                                   str(port)]) for r in range(ranks)]
        try:
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"DCP writer ranks exited with {codes}")


if __name__ == "__main__":  # one rank of build_dcp_checkpoints
    _save_rank(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(Path(sys.argv[1]).read_text()))
