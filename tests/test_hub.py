"""Push to the Hub, end to end against tests/hub_server.py (a real HTTP server on 127.0.0.1 that
speaks the endpoints huggingface_hub calls), and the model card."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from hub_server import HubServer
from safetensors.torch import save_file

from converter.errors import HubError, OutputError
from converter.files import INDEX_FILE, PROVENANCE_FILE, STATE_DIR, VERIFY_REPORT_FILE
from converter.hub.modelcard import render_model_card, sglang_command, write_model_card
from converter.hub.push import (
    hub_errors,
    list_upload_files,
    plan_commits,
    push_checkpoint,
)

TOKEN = "hf_" + "A1b2C3d4E5" * 4  # looks like a real token, so scrubbing is exercised too
BAD_TOKEN = "hf_" + "Zz9Yy8Xx7W" * 4
REPO = "alice/DeepSeek-V3-MXFP8"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def _isolated_hub_client(monkeypatch, tmp_path):
    """No real Hub, no stored login, loopback only. Xet stays as installed: the server offers none,
    so every push must fall back to git-LFS on its own."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            raise OSError(f"test tried to reach {address[0]}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK:
            raise OSError(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub", users={TOKEN: "alice"}, lfs_threshold=4096) as server:
        yield server
    assert server.errors == []
    assert server.unhandled == []  # every request huggingface_hub sent was one we implement


def make_dst(root: Path, *, verified: bool | None = True, source_path: Path | None = None,
             moe_layout: str = "canonical", auto_map: bool = False) -> Path:
    """A tiny converted checkpoint, built by hand: three shards, config, index, provenance, report."""
    dst = root / "dst"
    dst.mkdir()
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(SHARDS):
        name = f"model.layers.{i}.mlp.down_proj"
        tensors = {
            f"{name}.weight": torch.randint(0, 255, (64, 256), generator=gen, dtype=torch.uint8)
            .view(torch.float8_e4m3fn),
            f"{name}.weight_scale_inv": torch.randint(100, 140, (64, 8), generator=gen, dtype=torch.uint8),
            f"model.layers.{i}.self_attn.kv_b_proj.weight": torch.randn(32, 16, generator=gen).to(torch.bfloat16),
        }
        save_file(tensors, dst / shard)
        weight_map.update({t: shard for t in tensors})
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    kept = [f"model.layers.{i}.self_attn.kv_b_proj" for i in range(3)]
    quant = {"quant_method": "mxfp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [1, 32],
             "scale_fmt": "ue8m0", "modules_to_not_convert": kept}
    if moe_layout == "trtllm":
        quant["moe_weight_layout"] = {"backend": "flashinfer_trtllm", "epilogue_tile_m": 128}
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "quantization_config": quant}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "tokenizer.json").write_bytes(json.dumps({"vocab": list(range(1500))}).encode())  # > LFS threshold
    recipe = {"name": "deepseek_v3_mxfp8", "target": "mxfp8", "scale_rule": "rceil", "moe_layout": moe_layout,
              "keep_bf16": ["model.layers.*.self_attn.kv_b_proj", "model.layers.*.mlp.shared_experts.*"],
              "keep_first_layers": 0, "keep_last_layers": 0}
    provenance = {"mxconv_version": "0.1.0", "created": "2025-11-27T12:00:00+00:00", "complete": True,
                  "source": {"path": str(source_path or root / "src"), "format": "fp8", "mapping": "hf",
                             "base_model": "deepseek-ai/DeepSeek-V3", "shards": {}},
                  "recipe": recipe, "options": {},
                  "output": {"shards": 3, "total_size": 0, "tensors": {"mxfp8": 3, "bf16": 3, "copied": 0},
                             "modules_to_not_convert": kept}}
    (dst / PROVENANCE_FILE).write_text(json.dumps(provenance))
    if verified is not None:
        report = {"passed": verified,
                  "checks": {"coverage": {"passed": True, "failures": []},
                             "numerics": {"passed": verified, "failures": []}},
                  "summary": {"tensors": 3, "min_sqnr_db": 30.9, "mean_sqnr_db": 31.2,
                              "logits": {"cosine": 0.99991, "top1_agreement": 0.987, "kl": 0.0012}}}
        (dst / VERIFY_REPORT_FILE).write_text(json.dumps(report))
    # Never uploaded: resume state and a temporary file of an atomic write.
    (dst / STATE_DIR).mkdir()
    (dst / STATE_DIR / "manifest.json").write_text("{}")
    (dst / STATE_DIR / "part.safetensors").write_bytes(b"x" * 5000)
    (dst / ".config.json.tmp").write_text("{}")
    return dst


def push(dst: Path, hub: HubServer, **kwargs):
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("quiet", True)
    # Small commit budget: one shard per commit, so multi-commit behaviour is exercised.
    kwargs.setdefault("max_commit_bytes", 1)
    return push_checkpoint(dst, REPO, endpoint=hub.url, **kwargs)


def assert_repo_matches(hub: HubServer, dst: Path, revision: str = "main") -> None:
    expected = list_upload_files(dst)
    remote = hub.files(REPO, revision)
    assert set(remote) - {".gitattributes"} == set(expected)
    for path in expected:
        assert (hub.repo_dir(REPO, revision) / path).read_bytes() == (dst / path).read_bytes(), path


def test_push_uploads_every_file_byte_identical(hub, tmp_path):
    dst = make_dst(tmp_path)
    result = push(dst, hub)

    assert_repo_matches(hub, dst)
    files = hub.files(REPO)
    assert all(files[s].sha256 for s in SHARDS) and files["tokenizer.json"].sha256  # went through LFS
    assert files["config.json"].sha256 is None  # small files are regular git blobs
    assert not any(p.startswith(STATE_DIR) or p.endswith(".tmp") for p in files)
    assert sorted(result.uploaded) == sorted(list_upload_files(dst)) and "README.md" in result.uploaded
    assert result.skipped == [] and result.bytes_uploaded == sum(list_upload_files(dst).values())
    assert result.model_card == dst / "README.md"
    assert result.url == f"{hub.url}/{REPO}" and len(result.commits) == 4
    # Weights first, one commit each; config, index, card and provenance together, last.
    commits = hub.commits(REPO)[1:]
    assert [c["paths"] for c in commits[:3]] == [[s] for s in SHARDS]
    assert {"config.json", INDEX_FILE, "README.md", PROVENANCE_FILE} <= set(commits[3]["paths"])
    assert not hub.repos[REPO].private


def test_falls_back_to_lfs_when_the_endpoint_has_no_xet(hub, tmp_path):
    xet_installed = importlib.util.find_spec("hf_xet") is not None
    disabled_before = huggingface_hub.constants.HF_HUB_DISABLE_XET
    result = push(make_dst(tmp_path), hub)
    assert result.transfer == "lfs" and len(hub.lfs_puts) == 4
    asked_for_xet = ("GET", f"/api/models/{REPO}/xet-write-token/main") in hub.requests
    assert asked_for_xet == (xet_installed and not disabled_before)
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET == disabled_before  # switch restored


def test_rerun_uploads_nothing_new(hub, tmp_path):
    dst = make_dst(tmp_path)
    push(dst, hub, max_commit_bytes=10**9)
    commits, puts = len(hub.commits(REPO)), len(hub.lfs_puts)

    again = push(dst, hub)
    assert again.uploaded == [] and again.commits == [] and again.transfer is None
    assert sorted(again.skipped) == sorted(list_upload_files(dst)) and again.remote_only == []
    assert len(hub.commits(REPO)) == commits and len(hub.lfs_puts) == puts

    (dst / "tokenizer.json").rename(dst / "tokenizer.model")  # a file the repo holds but DST no longer
    third = push(dst, hub)
    assert third.uploaded == ["tokenizer.model"] and third.remote_only == ["tokenizer.json"]


def test_changed_file_is_uploaded_again(hub, tmp_path):
    dst = make_dst(tmp_path)
    push(dst, hub)
    (dst / "tokenizer.json").write_bytes((dst / "tokenizer.json").read_bytes().replace(b"1", b"7"))  # same size

    result = push(dst, hub)
    assert result.uploaded == ["tokenizer.json"]
    assert_repo_matches(hub, dst)


def test_failed_lfs_upload_resumes_on_rerun(hub, tmp_path):
    dst = make_dst(tmp_path)
    hub.fail_once("PUT", r"^/lfs-objects/", 400, nth=2)  # the second shard's upload breaks

    with pytest.raises(HubError, match="re-run the same command to resume") as err:
        push(dst, hub)
    assert TOKEN not in str(err.value)
    assert set(hub.files(REPO)) == {".gitattributes", SHARDS[0]}  # the first commit landed

    result = push(dst, hub)
    assert result.skipped == [SHARDS[0]]
    assert_repo_matches(hub, dst)
    assert len(hub.lfs_puts) == len(set(hub.lfs_puts))  # nothing was sent twice


def test_failed_commit_resumes_without_resending_bytes(hub, tmp_path):
    dst = make_dst(tmp_path)
    hub.fail_once("POST", r"/commit/", 500, nth=3)  # the third shard's commit

    with pytest.raises(HubError, match="HTTP 500"):
        push(dst, hub)
    assert set(hub.files(REPO)) == {".gitattributes", SHARDS[0], SHARDS[1]}
    assert len(hub.lfs_puts) == 3  # the third shard reached LFS storage, its commit did not

    result = push(dst, hub)
    assert sorted(result.skipped) == SHARDS[:2] and SHARDS[2] in result.uploaded
    assert_repo_matches(hub, dst)
    assert len(hub.lfs_puts) == 4 and len(set(hub.lfs_puts)) == 4  # only tokenizer.json was new


def test_push_to_branch_and_private_repo(hub, tmp_path):
    dst = make_dst(tmp_path)
    result = push(dst, hub, revision="mxfp8", private=True, commit_message="MXFP8 weights")

    assert_repo_matches(hub, dst, revision="mxfp8")
    assert set(hub.files(REPO)) == {".gitattributes"}  # main untouched
    assert hub.repos[REPO].private and result.url.endswith("/tree/mxfp8")
    assert hub.commits(REPO, "mxfp8")[-1]["summary"] == "MXFP8 weights (part 4/4)"


def test_repo_id_without_namespace_goes_to_the_token_owner(hub, tmp_path):
    dst = make_dst(tmp_path)
    result = push_checkpoint(dst, REPO.split("/")[1], token=TOKEN, endpoint=hub.url, quiet=True)
    assert result.repo_id == REPO and result.url == f"{hub.url}/{REPO}"
    assert f"--model-path {REPO}" in (hub.repo_dir(REPO) / "README.md").read_text()


def test_private_push_refuses_an_existing_public_repo(hub, tmp_path):
    dst = make_dst(tmp_path)
    push(dst, hub)
    with pytest.raises(HubError, match="already exists and is public"):
        push(dst, hub, private=True)


def test_bad_token_is_one_clear_error_without_the_token(hub, tmp_path, monkeypatch, capfd, caplog):
    dst = make_dst(tmp_path)
    with pytest.raises(HubError, match="rejected the token") as err:
        push(dst, hub, token=BAD_TOKEN, quiet=False)
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)  # the same through the environment
    with pytest.raises(HubError, match="rejected the token") as err_env:
        push(dst, hub, token=None, quiet=False)
    out = capfd.readouterr()
    for text in (str(err.value), str(err_env.value), out.out, out.err, caplog.text):
        assert BAD_TOKEN not in text
    assert REPO not in hub.repos


def test_token_from_environment_is_used(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(make_dst(tmp_path), hub, token=None)
    assert REPO in hub.repos


def test_missing_token_and_foreign_namespace(hub, tmp_path):
    dst = make_dst(tmp_path)
    with pytest.raises(HubError, match="no Hugging Face token"):
        push(dst, hub, token=None)
    with pytest.raises(HubError, match="403"):
        push_checkpoint(dst, "bob/model", token=TOKEN, endpoint=hub.url, quiet=True)


def test_error_messages_never_carry_the_token():
    with pytest.raises(HubError) as err:
        with hub_errors("http://hub", REPO, TOKEN, "testing"):
            raise ValueError(f"server echoed Authorization: Bearer {TOKEN} and {BAD_TOKEN}")
    assert TOKEN not in str(err.value) and BAD_TOKEN not in str(err.value) and "testing failed" in str(err.value)


def test_unreachable_endpoint_fails_fast(tmp_path):
    dst = make_dst(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1") as err:
        push_checkpoint(dst, REPO, token=TOKEN, endpoint=f"http://127.0.0.1:{port}", quiet=True)
    assert time.monotonic() - start < 10 and TOKEN not in str(err.value)


def test_endpoint_from_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = push_checkpoint(make_dst(tmp_path), REPO, token=TOKEN, quiet=True)
    assert result.url.startswith(hub.url) and REPO in hub.repos


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / PROVENANCE_FILE).unlink(), "incomplete conversion"),
    (lambda d: (d / SHARDS[1]).unlink(), "shards listed"),
    (lambda d: (d / VERIFY_REPORT_FILE).unlink(), "unverified"),
    (lambda d: (d / VERIFY_REPORT_FILE).write_text(json.dumps({"passed": False})), "unverified"),
])
def test_refuses_incomplete_or_unverified_unless_forced(hub, tmp_path, damage, reason):
    dst = make_dst(tmp_path)
    damage(dst)
    with pytest.raises(OutputError, match=reason):
        push(dst, hub)
    assert hub.requests == []  # refused before any network access

    result = push(dst, hub, force=True)
    assert any(reason in w for w in result.warnings)
    assert_repo_matches(hub, dst)


def test_dry_run_writes_the_card_and_touches_no_network(tmp_path, monkeypatch):
    dst = make_dst(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("dry run touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    result = push_checkpoint(dst, REPO, dry_run=True, quiet=True)  # no token needed either

    assert result.dry_run and result.model_card == dst / "README.md" and (dst / "README.md").is_file()
    assert sorted(result.uploaded) == sorted(list_upload_files(dst))
    assert not any(p.startswith(STATE_DIR) or p.endswith(".tmp") for p in result.uploaded)
    assert result.url == f"https://huggingface.co/{REPO}"


def test_plan_commits_puts_weights_first_and_metadata_last():
    files = {"a.safetensors": 40, "b.safetensors": 40, "c.safetensors": 100, "config.json": 1, "README.md": 1}
    assert plan_commits(files, max_commit_bytes=90) == [
        ["a.safetensors", "b.safetensors"], ["c.safetensors"], ["README.md", "config.json"]]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_model_card_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: deepseek\nlicense_link: LICENSE\n---\n# V3\n")
    dst = make_dst(tmp_path, source_path=src)
    card = render_model_card(dst, repo_id=REPO)
    meta = front_matter(card)

    assert meta["base_model"] == "deepseek-ai/DeepSeek-V3" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "sglang" and meta["pipeline_tag"] == "text-generation"
    assert {"mxfp8", "deepseek_v3"} <= set(meta["tags"])
    assert meta["license"] == "other"
    assert meta["license_link"] == "https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/LICENSE"
    assert "`kv_b_proj` in every layer" in card and "`model.layers.*.mlp.shared_experts.*`" in card
    assert "`deepseek_v3_mxfp8`" in card and "RCEIL" in card and "dequantized as DeepSeek does" in card
    assert "3 MXFP8, 3 BF16" in card and "lists the 3 unquantized" in card
    assert "min 30.9 dB" in card and "top-1 agreement 98.70 %" in card and "`mxconv verify` passed" in card
    assert f"--model-path {REPO}" in card and "--quantization mxfp8" in card
    assert "--moe-runner-backend flashinfer_trtllm" in card and "--tp-size 8" in card
    assert "--trust-remote-code" not in card and "--ep-size" not in card  # canonical layout, no custom code
    assert "3 safetensors shards" in card


def test_model_card_variants(tmp_path):
    (tmp_path / "trtllm").mkdir()
    (tmp_path / "canonical").mkdir()
    dst = make_dst(tmp_path / "trtllm", verified=None, moe_layout="trtllm", auto_map=True)
    card = render_model_card(dst)
    assert "Not verified" in card and "pre-shuffled" in card
    # Issue 18: SGLang cannot load pre-shuffled experts; the card says so and gives no SGLang command.
    assert "Who can load it: not SGLang" in card and "NOT SGLang" in card and "mxconv unshuffle" in card
    assert "sglang.launch_server" not in card and "load_moe_layer" in card
    assert "license" not in front_matter(card)  # the source card is not available
    dst = make_dst(tmp_path / "canonical", verified=None, auto_map=True)
    card = render_model_card(dst)
    assert "--trust-remote-code" in card and "--ep-size" not in card and "transformers 5.x" in card
    assert f"--model-path {dst}" in card  # no repo id: the local path


def test_base_model_card_copied_from_the_source_is_replaced(tmp_path):
    cache = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3" / "snapshots" / "0123abcd"
    cache.mkdir(parents=True)
    source_card = "---\nlicense: mit\nlicense_link: LICENSE\n---\n# DeepSeek-V3\n"
    (cache / "README.md").write_text(source_card)
    dst = make_dst(tmp_path, source_path=cache)
    prov = json.loads((dst / PROVENANCE_FILE).read_text())
    prov["source"]["base_model"] = None  # as when the source config has no _name_or_path
    (dst / PROVENANCE_FILE).write_text(json.dumps(prov))
    (dst / "README.md").write_text(source_card)  # the conversion copies side files, README included
    (dst / "LICENSE").write_text("MIT")

    assert write_model_card(dst, repo_id=REPO) == dst / "README.md"
    meta = front_matter((dst / "README.md").read_text())
    assert meta["base_model"] == "deepseek-ai/DeepSeek-V3"  # from the cache path
    assert meta["license"] == "mit" and meta["license_link"] == "LICENSE"  # the file travels with the repo


def test_existing_readme_is_kept(tmp_path):
    dst = make_dst(tmp_path)
    (dst / "README.md").write_text("my own card")
    assert write_model_card(dst) is None
    assert push_checkpoint(dst, REPO, dry_run=True).model_card is None
    assert (dst / "README.md").read_text() == "my own card"
    assert write_model_card(dst, overwrite=True) == dst / "README.md"
    assert front_matter((dst / "README.md").read_text())["library_name"] == "sglang"


def test_sglang_command_without_mxfp8():
    assert sglang_command("m", config={}) == "python3 -m sglang.launch_server \\\n  --model-path m \\\n  --tp-size 8"


def test_ctrl_c_during_push_says_so_and_the_rerun_resumes(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from typer.testing import CliRunner

    from converter.cli import app

    dst = make_dst(tmp_path)
    real, calls = HfApi.upload_folder, []

    def upload_folder(self, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:  # Ctrl-C during the second commit (the metadata, after the shards)
            raise KeyboardInterrupt
        return real(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["push", str(dst), REPO, "-q"])
    assert result.exit_code == 130
    assert result.stderr == ("mxconv: interrupted: 1 of 2 commit(s) pushed (3 of 9 file(s)); rerun the same "
                             "command to resume: files already there are skipped\n")
    assert "Traceback" not in result.output
    assert set(hub.files(REPO)) == {".gitattributes", *SHARDS}  # nothing that looks loadable: no config yet
    again = CliRunner().invoke(app, ["push", str(dst), REPO, "-q"])
    assert again.exit_code == 0, again.output
    assert "3 already there" in again.stdout
    assert_repo_matches(hub, dst)
