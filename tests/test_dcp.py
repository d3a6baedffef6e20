"""Issue 14: PyTorch DCP training checkpoints (Megatron-core torch_dist, FSDP2 with HF names)
convert straight to output byte-identical, tensor by tensor, to the conversion of the HF
checkpoint holding the same weights; CLI, dry run, resume, verify; only weights are read."""

import pytest
from cli_process import run_mxconv
from helpers import load_all, read_json, same_bytes

import converter
from converter.errors import MappingError, MxconvError, SourceError
from converter.sources import dcp_chunks
from converter.sources.dcp import DcpCheckpoint, _wrapper_prefix

RECIPES = ["deepseek_v3_mxfp8", "deepseek_v3_mxfp8_trtllm"]


@pytest.fixture(scope="module")
def hf_outputs(dcp_sources, tmp_path_factory):
    out = {}
    for recipe in RECIPES:
        dst = tmp_path_factory.mktemp("hf-out") / recipe
        converter.convert(dcp_sources["hf"], dst, recipe=recipe, quiet=True)
        out[recipe] = dst
    return out


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kind, mapping", [("megatron", "megatron"), ("fsdp", "hf"), ("hf_dcp", "hf"),
                                           ("torchtitan", "torchtitan")])
def test_dcp_converts_to_the_same_bytes(dcp_sources, hf_outputs, tmp_path, kind, mapping, recipe):
    dst = tmp_path / "out"
    result = converter.convert(dcp_sources[kind], dst, recipe=recipe, config=dcp_sources["hf"], quiet=True)
    assert result.mapping == mapping  # detected
    want_dir = hf_outputs[recipe]
    want, got = load_all(want_dir), load_all(dst)
    assert set(got) == set(want)  # every tensor an HF-named conversion holds, the MTP copies included
    for name, t in got.items():
        assert same_bytes(t, want[name]), name
    assert (dst / "config.json").read_bytes() == (want_dir / "config.json").read_bytes()
    for side in ("tokenizer_config.json", "generation_config.json", "LICENSE"):  # from --config
        assert (dst / side).read_bytes() == (dcp_sources["hf"] / side).read_bytes()
    assert set(read_json(dst / "model.safetensors.index.json")["weight_map"]) == set(want)
    # file for file: the same shards, tensors in the same order, the same index
    shards = sorted(p.name for p in want_dir.glob("*.safetensors"))
    assert sorted(p.name for p in dst.glob("*.safetensors")) == shards
    for name in shards + ["model.safetensors.index.json"]:
        assert (dst / name).read_bytes() == (want_dir / name).read_bytes(), name
    prov = read_json(dst / "mxconv.json")
    assert prov["source"]["mapping"] == mapping
    assert (".metadata" in prov["source"]["shards"]) == (kind != "hf_dcp")


def test_only_weight_chunks_are_read(dcp_sources, tmp_path, monkeypatch):
    """Optimizer state, _extra_state, rng_state and common_state bytes are never read, and the
    chunk saved with transposed strides is read through its strides."""
    ckpt = DcpCheckpoint.open(dcp_sources["megatron"], dcp_sources["hf"])
    records = {(c.file, c.offset, c.offset + c.length) for t in ckpt.tensors.values() for c in t.chunks}
    assert not any(n.startswith(("optimizer", "rng", "common")) or "_extra_state" in n for n in ckpt.tensors)
    reads = []
    real = dcp_chunks._pread

    def watch(fd, view, at, file, tensor):
        reads.append((file, at, at + len(view)))
        return real(fd, view, at, file, tensor)

    real_rows = dcp_chunks._pread_rows

    def watch_rows(fd, views, at, file, tensor):  # column chunks: rows scattered into the piece
        reads.append((file, at, at + sum(len(v) for v in views)))
        return real_rows(fd, views, at, file, tensor)

    monkeypatch.setattr(dcp_chunks, "_pread", watch)
    monkeypatch.setattr(dcp_chunks, "_pread_rows", watch_rows)
    converter.convert(dcp_sources["megatron"], tmp_path / "out", config=dcp_sources["hf"], quiet=True, workers=1)
    assert reads
    for file, a, b in reads:
        assert any(f == file and s <= a and b <= e for f, s, e in records), (file, a, b)
    fresh = DcpCheckpoint.open(dcp_sources["megatron"], dcp_sources["hf"])
    t = fresh.tensors["decoder.layers.0.self_attention.linear_proj.weight"]
    t.read()
    assert sorted(loc.contiguous for loc in t.reader.located.values()) == [False, True]


def test_megatron_chunking_is_megatron_like(dcp_sources):
    ckpt = DcpCheckpoint.open(dcp_sources["megatron"], dcp_sources["hf"])
    fc1 = ckpt.tensors["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    e, two_i, h = fc1.global_shape
    assert sorted(c.offsets for c in fc1.chunks) == [(k, j, 0) for k in range(e) for j in (0, two_i // 2)]
    assert len({c.file for c in fc1.chunks}) == 2  # experts spread over both ranks' files
    emb = ckpt.tensors["embedding.word_embeddings.weight"]
    assert emb.global_shape[0] == 640 and len(emb.chunks) == 2  # padded vocabulary, vocab-parallel
    proj = ckpt.tensors["decoder.layers.0.self_attention.linear_proj.weight"]
    assert [c.offsets[1] for c in sorted(proj.chunks, key=lambda c: c.offsets)] == [0, proj.global_shape[1] // 2]
    assert len(ckpt.tensors["decoder.layers.0.input_layernorm.weight"].chunks) == 1


def test_cli_dry_run_convert_resume_verify(dcp_sources, tmp_path):
    src, cfg, dst, logs = dcp_sources["megatron"], dcp_sources["hf"], tmp_path / "out", tmp_path / "logs"
    dry = run_mxconv(["convert", src, dst, "--config", cfg, "--dry-run"], logs)
    assert dry.returncode == 0 and "megatron" in dry.stdout and not dst.exists(), dry
    done = run_mxconv(["convert", src, dst, "--config", cfg, "-q"], logs)
    assert done.returncode == 0, done.stderr
    again = run_mxconv(["convert", src, dst, "--config", cfg, "-q"], logs)
    assert again.returncode == 0 and "already" in again.stdout.lower(), again
    checked = run_mxconv(["verify", src, dst, "-q"], logs)  # --config recorded by the conversion
    assert checked.returncode == 0, checked.stdout + checked.stderr
    missing = run_mxconv(["convert", src, tmp_path / "o2", "-q"], logs)
    assert missing.returncode == 1 and "--config" in missing.stderr and "Traceback" not in missing.stderr


def test_forced_wrong_mapping_and_prefixes(dcp_sources, tmp_path):
    with pytest.raises(MappingError):
        converter.convert(dcp_sources["megatron"], tmp_path / "o", mapping="hf", config=dcp_sources["hf"], quiet=True)
    assert not (tmp_path / "o").exists()
    hf = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"]
    for prefix in ("model_state.model.", "dcp.model.", "model.", ""):
        assert _wrapper_prefix([prefix + n for n in hf]) == prefix
    assert _wrapper_prefix(["decoder.layers.0.input_layernorm.weight", "embedding.word_embeddings.weight"]) == ""


def test_config_is_only_for_dcp_sources(dcp_sources, tmp_path):
    with pytest.raises(MxconvError, match="--config"):
        converter.convert(dcp_sources["hf"], tmp_path / "o", config=dcp_sources["hf"], quiet=True)
    with pytest.raises(SourceError, match="--config"):
        converter.convert(dcp_sources["fsdp"], tmp_path / "o", quiet=True)


def test_any_row_range_reads_the_right_bytes(dcp_sources):
    """Row pieces cut anywhere (what converter.run.pieces asks for on big tensors) across column
    chunks, a chunk with transposed strides, one expert of stacked experts, a trimmed vocabulary."""
    import dataclasses

    import torch

    from converter.models.dcp_demo import load_hf
    from converter.run.pipeline import open_source

    hf = load_hf(dcp_sources["hf"])
    ckpt, view, _ = open_source(dcp_sources["megatron"], config=dcp_sources["hf"])
    assert view.derivations is None  # every canonical tensor is a byte range: pieces apply
    gen = torch.Generator().manual_seed(0)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight",
                 "model.embed_tokens.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.shared_experts.gate_proj.weight"):
        info = ckpt.tensors[name]
        rows, row_bytes = info.shape[0], info.nbytes // info.shape[0]
        for _ in range(5):
            r0 = int(torch.randint(0, rows, (1,), generator=gen))
            r1 = int(torch.randint(r0 + 1, rows + 1, (1,), generator=gen))
            part = dataclasses.replace(info, shape=(r1 - r0, *info.shape[1:]), start=info.start + r0 * row_bytes,
                                       end=info.start + r1 * row_bytes)
            out = torch.full((part.nbytes + 64,), 0xAB, dtype=torch.uint8)
            got = part.read(out=out)
            assert torch.equal(got.view(torch.uint8), hf[name][r0:r1].contiguous().view(torch.uint8)), (name, r0, r1)
            assert bool((out[part.nbytes:] == 0xAB).all())  # nothing written past the piece


def test_interrupted_dcp_conversion_resumes(dcp_sources, tmp_path):
    """An interrupted run (last shard and the completion marker missing) is resumed: finished
    shards are kept, the rest redone, same bytes."""
    src, cfg, dst = dcp_sources["megatron"], dcp_sources["hf"], tmp_path / "out"
    first = converter.convert(src, dst, config=cfg, quiet=True, max_shard_size="1MB")
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) >= 3 and first.skipped_shards == 0
    want = load_all(dst)
    (dst / "mxconv.json").unlink()
    shards[-1].unlink()
    again = converter.convert(src, dst, config=cfg, quiet=True, max_shard_size="1MB")
    assert again.skipped_shards == len(shards) - 1 and not again.already_complete
    got = load_all(dst)
    assert set(got) == set(want) and all(same_bytes(got[n], want[n]) for n in want)
    assert (dst / "mxconv.json").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", RECIPES)
def test_dcp_on_cuda_gives_the_same_bytes(dcp_sources, hf_outputs, tmp_path, recipe):
    dst = tmp_path / "gpu"
    converter.convert(dcp_sources["megatron"], dst, recipe=recipe, config=dcp_sources["hf"], device="cuda",
                      workers=2, quiet=True)
    want, got = load_all(hf_outputs[recipe]), load_all(dst)
    assert set(got) == set(want) and all(same_bytes(got[n], want[n]) for n in want)


def test_torchtitan_names_and_expert_parallel_chunks(dcp_sources):
    """torchtitan's names at the top level, routed experts stacked [E, F, D] / [E, D, F] and split
    over the ranks along the expert axis, no MTP embedding or head, optimizer and train_state
    never read; the naming is detected as torchtitan's."""
    from converter.mapping.names import detect_mapping

    ckpt = DcpCheckpoint.open(dcp_sources["torchtitan"], dcp_sources["hf"])
    config = read_json(dcp_sources["hf"] / "config.json")
    e, n, h = config["n_routed_experts"], config["num_hidden_layers"], config["hidden_size"]
    w1 = ckpt.tensors["layers.1.moe.routed_experts.inner_experts.w1_EFD"]
    w2 = ckpt.tensors["layers.1.moe.routed_experts.inner_experts.w2_EDF"]
    assert w1.global_shape == (e, config["moe_intermediate_size"], h)
    assert w2.global_shape == (e, h, config["moe_intermediate_size"])
    assert sorted(c.offsets for c in w1.chunks) == [(0, 0, 0), (e // 2, 0, 0)]
    assert "mtp_layers.0.attention.wq_a.weight" in ckpt.tensors and "mtp_layers.0.mtp_norm.weight" in ckpt.tensors
    assert not any("embed_tokens" in t or "shared_head" in t or t.startswith(("optimizer", "train_state"))
                   for t in ckpt.tensors)
    assert not any(t.startswith("layers.") and int(t.split(".")[1]) >= n for t in ckpt.tensors)
    assert detect_mapping(ckpt.tensors) == "torchtitan"


def test_torchtitan_without_mtp(dcp_sources, tmp_path):
    """A torchtitan run without MTP has no MTP layer: with a config that says
    num_nextn_predict_layers 0 it converts to the bytes of the HF checkpoint without that layer;
    with the MTP config the output lacks the MTP layer."""
    from converter.models.dcp_demo import build_dcp_checkpoints
    from converter.models.demo import build_checkpoint, tiny_config

    config = dict(tiny_config(), num_nextn_predict_layers=0)
    hf = build_checkpoint(tmp_path / "hf", config, seed=5)
    build_dcp_checkpoints(hf, [{"kind": "torchtitan", "dst": tmp_path / "titan"}])
    assert not any(t.startswith("mtp_layers") for t in DcpCheckpoint.open(tmp_path / "titan", hf).tensors)
    converter.convert(hf, tmp_path / "want", quiet=True)
    result = converter.convert(tmp_path / "titan", tmp_path / "got", config=hf, mapping="torchtitan", quiet=True)
    assert result.mapping == "torchtitan"
    want = sorted(p.name for p in (tmp_path / "want").glob("*.safetensors"))
    assert want and sorted(p.name for p in (tmp_path / "got").glob("*.safetensors")) == want
    for name in want + ["model.safetensors.index.json", "config.json"]:
        assert (tmp_path / "got" / name).read_bytes() == (tmp_path / "want" / name).read_bytes(), name
    # with a config that has an MTP layer, the preflight lets the layer be absent as a whole (as for
    # any source: the main model still serves), and nothing of it is written
    n = read_json(dcp_sources["hf"] / "config.json")["num_hidden_layers"]
    converter.convert(tmp_path / "titan", tmp_path / "mtp", config=dcp_sources["hf"], quiet=True)
    names = read_json(tmp_path / "mtp" / "model.safetensors.index.json")["weight_map"]
    assert names and not any(t.startswith(f"model.layers.{n}.") for t in names)


def test_unshuffled_trtllm_conversion_verifies_against_the_dcp_source(dcp_sources, hf_outputs, tmp_path):
    """The --config of a DCP conversion is part of its source record, so an unshuffled copy (whose
    provenance keeps the original source) verifies against the DCP directory without --config,
    and equals the canonical conversion."""
    from converter.run.unshuffle import unshuffle
    from converter.verify.runner import verify_checkpoint

    packed, canonical = tmp_path / "packed", tmp_path / "canonical"
    converter.convert(dcp_sources["megatron"], packed, recipe="deepseek_v3_mxfp8_trtllm", config=dcp_sources["hf"],
                      quiet=True)
    result = unshuffle(packed, canonical, quiet=True)
    assert len(result.plan.modules_to_not_convert) == len(converter.convert(
        dcp_sources["megatron"], tmp_path / "direct", config=dcp_sources["hf"], quiet=True).plan.modules_to_not_convert)
    assert read_json(canonical / "mxconv.json")["source"]["config"] == str(dcp_sources["hf"].resolve())
    assert verify_checkpoint(dcp_sources["megatron"], canonical, quiet=True).passed
    want, got = load_all(hf_outputs["deepseek_v3_mxfp8"]), load_all(canonical)
    assert set(got) == set(want) and all(same_bytes(got[n], want[n]) for n in want)


def test_a_slice_names_a_file_that_holds_it(dcp_sources):
    """One expert of a stacked tensor names (in errors, and to the source hasher) a rank file that
    holds its chunks, not the file of the stacked tensor's first chunk."""
    from converter.run.pipeline import open_source

    ckpt, view, _ = open_source(dcp_sources["megatron"], config=dcp_sources["hf"])
    files = {name: {c.file for c in info.chunks} for name, info in ckpt.tensors.items()}
    assert all(info.file in files[name] for name, info in ckpt.tensors.items())
    experts = [n for n in ckpt.tensors if ".mlp.experts." in n and n.endswith("down_proj.weight")]
    assert len({ckpt.tensors[n].file for n in experts}) > 1  # experts of one stacked tensor in several files
    assert all(set(view.source_files(n)) == files[n] for n in experts)
