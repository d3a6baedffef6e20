"""Fuzz: mutated safetensors headers, index files and config.json must end in the project's clean
error (an MxconvError, which the CLI prints as one line) or in a successful conversion; never in
any other exception. Seeded and bounded (a few hundred cases in seconds).

Each case mutates a hard-linked clone of a small BF16 or FP8 checkpoint, runs the planning
stages (`convert(..., dry_run=True)`: index, headers, config, mapping, preflight, plan) and, when
those accept the input, the whole conversion (data reads, numerics, writes).
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import pytest
from mutate import INDEX, clone, join_safetensors, replace_file, split_safetensors

import converter.mapping.names
from converter.errors import MxconvError
from converter.models.demo import TINY_CONFIG, build_checkpoint
from converter.run.pipeline import convert

# MXCONV_FUZZ_SEED / MXCONV_FUZZ_CASES explore further locally (e.g. 5000 cases) without editing.
SEED = int(os.environ.get("MXCONV_FUZZ_SEED", 8))
CASES = int(os.environ.get("MXCONV_FUZZ_CASES", 300))

SMALL_CONFIG = dict(TINY_CONFIG, vocab_size=64, hidden_size=128, intermediate_size=64, moe_intermediate_size=32,
                    num_hidden_layers=2, n_routed_experts=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                    qk_rope_head_dim=32, v_head_dim=32, num_attention_heads=1)

JUNK = [None, -1, 0, 1, 7, 1.5, True, "7", "", [], [1, 2], {}, {"a": 1}, 2**40, 2**64, -2**63, float("inf")]
DTYPES = ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "U8", "I8", "I64", "BOOL", "bf16", "F4", ""]


# --- safetensors files ----------------------------------------------------------------------

def mutate_shard(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    kind = rng.choice(["flip", "length", "truncate", "append", "json", "json", "json", "json"])
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        out = bytes(b)
    elif kind == "length":
        value = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(data) - 8, len(data), 2**63 - 1, 2**64 - 1,
                            rng.randrange(2**32)])
        out = value.to_bytes(8, "little") + data[8:]
    elif kind == "truncate":
        out = data[:rng.randrange(len(data))]
    elif kind == "append":
        out = data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        header, body = split_safetensors(data)
        try:
            kind = mutate_header(rng, header)
            out = join_safetensors(header, body)
        except _RawHeader as raw:  # a header that is not an object, or not JSON at all
            kind = f"raw header {raw.text[:16]!r}"
            text = raw.text.encode("utf-8", "surrogateescape")
            out = len(text).to_bytes(8, "little") + text + body
    replace_file(path, out)
    return f"{path.name}: {kind}"


def mutate_header(rng: random.Random, header: dict) -> str:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "offsets", "delete", "rename", "duplicate", "entry",
                       "metadata", "extra_key", "whole"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES + JUNK)
    elif kind == "shape":
        shape = list(entry["shape"])
        choice = rng.randrange(8)
        if choice == 0:
            shape = shape[:-1]
        elif choice == 1:
            shape = shape + [1]
        elif choice == 2 and shape:
            shape[rng.randrange(len(shape))] *= 2
        elif choice == 3 and len(shape) == 2:
            shape = [shape[1], shape[0]]
        elif choice == 4 and shape:
            shape[rng.randrange(len(shape))] = rng.choice(JUNK)
        elif choice == 5:
            shape = rng.choice(JUNK)
        elif choice == 6 and shape:
            shape = [shape[0] // 2, shape[-1] * 2] if len(shape) == 2 else [shape[0] * 2]
        else:
            shape = [0] + shape[1:]
        entry["shape"] = shape
    elif kind == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([
            [b, a], [a + 1, b + 1], [a - 1, b - 1], [a, b + 1], [0, b - a], [a, a], [a, b, b], [a],
            [a + 2**40, b + 2**40], [str(a), b], [a, float(b)], None, rng.choice(JUNK), [-8, b - a - 8]])
    elif kind == "delete":
        del header[name]
    elif kind == "rename":
        header[rng.choice([name.replace("layers.1", "layers.7"), name.replace("experts.0", "experts.9"),
                           name + "x", "model.unknown.weight", name.replace(".weight", ".weight_scale_inv"),
                           rng.choice(names)])] = header.pop(name)
    elif kind == "duplicate":
        header[name + "_copy" if rng.random() < 0.5 else name.replace("weight", "bias")] = dict(entry)
    elif kind == "entry":
        header[name] = rng.choice(JUNK)
    elif kind == "metadata":
        header["__metadata__"] = rng.choice(JUNK + [{"format": "pt", "x": [1]}, {"format": {"a": 1}}])
    elif kind == "extra_key":
        entry[rng.choice(["foo", "dtype2", "data"])] = rng.choice(JUNK)
    else:
        raise _RawHeader(rng.choice(["[]", '"x"', "1", "null", "[" * 100000 + "]" * 100000, '{"a": ' * 50000,
                                     '{"x": 1' + "0" * 5000 + "}", "\udcff\udcfe", "{}"]))
    return f"header {kind} {name}"


class _RawHeader(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


# --- index and config -------------------------------------------------------------------------

def mutate_index(rng: random.Random, root: Path) -> str:
    path = root / INDEX
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    name = rng.choice(list(wm))
    files = sorted(set(wm.values()))
    kind = rng.choice(["not_json", "not_object", "weight_map", "drop", "add", "repoint", "missing_file",
                       "outside", "value", "pickle", "metadata", "delete_index", "long_name"])
    if kind == "not_json":
        replace_file(path, rng.choice([b"", b"{", b"\xff\xfe\x00", b'{"weight_map": {"a": "b"'])); return kind
    if kind == "not_object":
        replace_file(path, json.dumps(rng.choice([[], "x", 1, None])).encode()); return kind
    if kind == "delete_index":
        path.unlink(); return kind
    if kind == "weight_map":
        index["weight_map"] = rng.choice(JUNK)
    elif kind == "drop":
        del wm[name]
    elif kind == "add":
        wm[name + ".extra"] = rng.choice(files)
    elif kind == "repoint":
        wm[name] = rng.choice(files)
    elif kind == "missing_file":
        wm[name] = "model-00042-of-00042.safetensors"
    elif kind == "outside":
        wm[name] = rng.choice(["/etc/passwd", "../" + files[0], "a/../../" + files[0], "sub/../" + files[0]])
    elif kind == "value":
        wm[name] = rng.choice(JUNK + ["a\x00b", ".", "/", " "])
    elif kind == "pickle":
        wm[name] = "pytorch_model-00001-of-00002.bin"
    elif kind == "long_name":
        wm[name] = "x" * 300 + ".safetensors"
    else:
        index["metadata"] = rng.choice(JUNK)
    replace_file(path, json.dumps(index).encode())
    return f"index {kind} {name}"


CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "moe_intermediate_size", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank",
               "num_nextn_predict_layers", "tie_word_embeddings", "architectures", "model_type",
               "quantization_config"]


def mutate_config(rng: random.Random, root: Path) -> str:
    path = root / "config.json"
    config = json.loads(path.read_text())
    kind = rng.choice(["not_json", "drop", "value", "value", "value", "nearby", "quant"])
    key = rng.choice(CONFIG_KEYS)
    if kind == "not_json":
        replace_file(path, rng.choice([b"", b"[]", b"{", b"\xff"])); return kind
    if kind == "drop":
        config.pop(key, None)
    elif kind == "value":
        config[key] = rng.choice(JUNK + [["DeepseekV3ForCausalLM", 1], "DeepseekV3ForCausalLM"])
    elif kind == "nearby":
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            config[key] = max(0, config[key] + rng.choice([-32, -1, 1, 32]))
    else:
        config["quantization_config"] = rng.choice([
            {"quant_method": "fp8"}, {"quant_method": "fp8", "weight_block_size": [128, 128]},
            {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
            {"quant_method": "awq"}, {"weight_block_size": 5}, "fp8", [], {"quant_method": ["fp8"]}, None])
    replace_file(path, json.dumps(config).encode())
    return f"config {kind} {key}"


# --- the run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-sources")
    return [build_checkpoint(root / p, SMALL_CONFIG, precision=p, seed=11, extra_files=False, shards=2)
            for p in ("bf16", "fp8")]


def test_fuzz_headers_index_and_config(fuzz_sources, tmp_path, monkeypatch):
    # the built-in mappings are parsed once, not once per case (only speed changes)
    monkeypatch.setattr(converter.mapping.names, "load_mapping", functools.lru_cache(converter.mapping.names.load_mapping))
    rng = random.Random(SEED)
    outcomes = {"error": 0, "dry_run_ok": 0, "converted": 0}
    for case in range(CASES):
        source = fuzz_sources[case % 2]
        src = clone(source, tmp_path / f"src-{case}")
        target = rng.random()
        if target < 0.6:
            what = mutate_shard(rng, rng.choice(sorted(src.glob("*.safetensors"))))
        elif target < 0.8:
            what = mutate_index(rng, src)
        else:
            what = mutate_config(rng, src)
        label = f"case {case} (seed {SEED}, {source.name}): {what}"
        try:
            convert(src, tmp_path / f"dst-{case}", dry_run=True, quiet=True)
            outcomes["dry_run_ok"] += 1
            convert(src, tmp_path / f"dst-{case}", quiet=True, max_shard_size="200KB")
            outcomes["converted"] += 1
        except MxconvError as e:
            outcomes["error"] += 1
            assert str(e) and "\n" not in str(e), label
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
    # the mutations were meaningful: most are refused, some are harmless (appended bytes, extra
    # header keys, ...) and convert
    print(f"fuzz outcomes over {CASES} cases:", outcomes)
    assert outcomes["error"] > CASES // 2, outcomes
    assert outcomes["converted"] > 5, outcomes
