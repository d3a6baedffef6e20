"""Issue 4 end to end: the same weights under Megatron-core and DeepSeek-inference names convert
to output byte-identical to the HF-named conversion (Megatron does not store the MTP layer's own
copies of the embedding and head: its output has the main model's there)."""

import json

import pytest
from helpers import load_all, read_json, same_bytes
from safetensors.torch import load_file

import converter
from converter.mapping.names import load_mapping, materialize
from converter.models.demo import write_sharded

MEGATRON_ABSENT = {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}


def rename_checkpoint(src, dst, mapping_name, prefix="", absent=()):
    """Write the tensors of the HF-named checkpoint `src` under another naming, 3 shards,
    leaving out the canonical tensors that naming does not store."""
    canonical = {}
    for path in src.glob("*.safetensors"):
        canonical.update(load_file(path))
    for name in list(canonical):
        if name in absent or name.removesuffix("_scale_inv") in absent:
            del canonical[name]
    cfg = read_json(src / "config.json")
    plan = load_mapping(mapping_name).plan_to_source({n: tuple(t.shape) for n, t in canonical.items()},
                                                     cfg["num_hidden_layers"], prefix=prefix)
    tensors = {name: materialize(d, canonical.__getitem__) for name, d in plan.items()}
    dst.mkdir()
    write_sharded(dst, tensors, shards=3, interleave=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def hf_output(tiny_sources, tmp_path_factory):
    out = {}
    for kind in ("bf16", "fp8"):
        dst = tmp_path_factory.mktemp("hf") / kind
        converter.convert(tiny_sources[kind], dst, quiet=True)
        out[kind] = load_all(dst), read_json(dst / "config.json")
    return out


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("mapping_name, prefix, absent", [
    ("megatron", "", MEGATRON_ABSENT),
    ("megatron", "module.module.", MEGATRON_ABSENT),
    ("deepseek", "", set()),
])
def test_other_namings_convert_to_the_same_bytes(tiny_sources, hf_output, tmp_path, kind, mapping_name, prefix,
                                                 absent):
    src = rename_checkpoint(tiny_sources[kind], tmp_path / "src", mapping_name, prefix, absent)
    assert not any(n.startswith("model.layers.") for n in load_all(src)), "source must really use other names"
    result = converter.convert(src, tmp_path / "out", quiet=True)  # mapping=auto must recognise it
    assert result.mapping == mapping_name
    want, want_cfg = hf_output[kind]
    got = load_all(tmp_path / "out")
    assert set(got) == set(want)  # the two MTP copies Megatron does not store are the main model's
    main = {"model.layers.3.embed_tokens.weight": "model.embed_tokens.weight",
            "model.layers.3.shared_head.head.weight": "lm_head.weight"}
    for name, t in got.items():
        assert same_bytes(t, want[main[name] if name in absent else name]), name
    cfg = read_json(tmp_path / "out" / "config.json")
    not_converted = cfg["quantization_config"].pop("modules_to_not_convert")
    assert cfg["quantization_config"].pop("ignored_layers") == not_converted
    want_cfg = json.loads(json.dumps(want_cfg))
    want_not_converted = want_cfg["quantization_config"].pop("modules_to_not_convert")
    want_cfg["quantization_config"].pop("ignored_layers")
    assert cfg == want_cfg
    assert not_converted == want_not_converted
    assert read_json(tmp_path / "out" / "mxconv.json")["source"]["mapping"] == mapping_name


def test_explicit_wrong_mapping_reports_unmatched_names(tiny_sources, tmp_path):
    from converter.errors import MappingError

    with pytest.raises(MappingError) as err:
        converter.convert(tiny_sources["bf16"], tmp_path / "out", mapping="megatron", quiet=True)
    assert "model.layers.0" in str(err.value) and not (tmp_path / "out").exists()
