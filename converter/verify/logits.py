"""Model-level check of `mxconv verify --logits`: the source and the dequantized destination, each
loaded into the transformers model class of their family (families/*.yaml `logits`:
`DeepseekV3ForCausalLM`, `Qwen3MoeForCausalLM`) in float32, run on the same fixed token ids;
their logits are compared (cosine, top-1 agreement, KL).

For models that fit in memory (the tiny demo model in the tests; nothing near 671B). One model
is built and filled tensor by tensor, first from SRC, then from DST, so the peak is one model in
float32 plus one tensor. transformers is an optional (test) dependency.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from converter.errors import MxconvError, VerifyError
from converter.numerics.dispatch import dequantize_fp8_block, dequantize_mxfp8
from converter.plan.view import CanonicalView
from converter.sources.checkpoint import SCALE_SUFFIX
from converter.verify.checks import Destination

TOKEN_SEED = 20250101
BATCH, SEQ_LEN = 4, 32
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class LogitsResult:
    cosine: float  # mean over positions of the cosine similarity of the two logit vectors
    min_cosine: float
    top1_agreement: float  # fraction of positions whose argmax token agrees
    kl: float  # mean over positions of KL(source || destination), in nats
    max_kl: float
    positions: int
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"cosine": self.cosine, "min_cosine": self.min_cosine, "top1_agreement": self.top1_agreement,
                "kl": self.kl, "max_kl": self.max_kl, "positions": self.positions,
                "token_ids": {"seed": TOKEN_SEED, "batch": BATCH, "seq_len": SEQ_LEN}}


def require_transformers(classes: tuple[str, ...] = ("DeepseekV3Config", "DeepseekV3ForCausalLM")) -> tuple:
    """The transformers classes named, or a VerifyError saying how to get them."""
    try:
        import transformers

        return tuple(getattr(transformers, c) for c in classes)
    except (ImportError, AttributeError) as e:
        raise VerifyError(f"--logits needs transformers with {classes[-1]} (pip install 'mxconv[test]'): "
                          f"{e}") from None


def fixed_token_ids(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(TOKEN_SEED)
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=gen)


def source_tensors(view: CanonicalView) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Canonical name -> thunk giving the source value (FP8 dequantized as DeepSeek does)."""
    for name in view.tensors:
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in view.tensors:
            continue
        scale = name + SCALE_SUFFIX
        if scale in view.tensors:
            yield name, lambda n=name, s=scale: dequantize_fp8_block(view.load(n), view.load(s))
        else:
            yield name, lambda n=name: view.load(n)


def destination_tensors(dest: Destination) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Canonical name -> thunk giving the dequantized DST value; pre-shuffled experts un-shuffled."""
    from converter.sources.safetensors import read_tensor

    def load(name: str) -> torch.Tensor:
        return read_tensor(dest.tensors[name])

    suffixes = (SCALE_SUFFIX, "_scale")  # weight_scale_inv, or vLLM's weight_scale (recipe scale_name)
    for name, info in dest.tensors.items():
        if any(name.endswith(s) and name[: -len(s)] in dest.tensors for s in suffixes):
            continue
        scale = next((name + s for s in suffixes if name + s in dest.tensors), name + SCALE_SUFFIX)
        if name.endswith(".w13_weight") and scale in dest.tensors:
            prefix = name[: -len(".w13_weight")]
            for part in ("gate_proj", "up_proj"):
                yield f"{prefix}.{part}.weight", lambda n=name, s=scale, p=part: _unpack_w13(load(n), load(s), p)
        elif name.endswith(".w2_weight") and scale in dest.tensors:
            yield name[: -len(".w2_weight")] + ".down_proj.weight", lambda n=name, s=scale: _unpack_w2(load(n), load(s))
        elif info.dtype == "F8_E4M3" and scale in dest.tensors:
            yield name, lambda n=name, s=scale: dequantize_mxfp8(load(n), load(s))
        else:
            yield name, lambda n=name: load(n)


def _unpack_w13(q: torch.Tensor, s: torch.Tensor, part: str) -> torch.Tensor:
    from converter.numerics.trtllm_layout import unpack_w13

    gate_q, gate_s, up_q, up_s = unpack_w13(q, s)
    return dequantize_mxfp8(gate_q, gate_s) if part == "gate_proj" else dequantize_mxfp8(up_q, up_s)


def _unpack_w2(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    from converter.numerics.trtllm_layout import unpack_w2

    return dequantize_mxfp8(*unpack_w2(q, s))


class _ModelFiller:
    """Copies canonical tensors into the model's state, fusing routed experts where transformers
    stores them as one [E, 2I, H] gate_up_proj (gate rows first) and one [E, H, I] down_proj."""

    def __init__(self, model: torch.nn.Module, num_hidden_layers: int, model_name: str = "the model"):
        self.state = model.state_dict(keep_vars=True)
        self.num_hidden_layers = num_hidden_layers
        self.model_name = model_name

    def _needed(self) -> set[tuple[str, tuple | None]]:
        need = set()
        for key, t in self.state.items():
            if key.endswith("experts.gate_up_proj"):
                need |= {(key, (e, p)) for e in range(t.shape[0]) for p in ("gate_proj", "up_proj")}
            elif key.endswith("experts.down_proj") and t.dim() == 3:
                need |= {(key, (e, "down_proj")) for e in range(t.shape[0])}
            elif not key.endswith("rotary_emb.inv_freq"):
                need.add((key, None))
        return need

    def _slot(self, target: str, index: tuple | None) -> torch.Tensor:
        t = self.state[target]
        if index is None:
            return t
        e, part = index
        if part == "down_proj":
            return t[e]
        half = t.shape[1] // 2
        return t[e, :half] if part == "gate_proj" else t[e, half:]

    @torch.no_grad()
    def fill(self, tensors: Iterator[tuple[str, Callable[[], torch.Tensor]]], what: str) -> None:
        filled: set = set()
        for name, thunk in tensors:
            m = _LAYER_RE.match(name)
            if m and int(m.group(1)) >= self.num_hidden_layers:
                continue  # MTP / NextN layer: transformers has no module for it
            key = self._target(name)
            if key is None:
                raise VerifyError(f"{what} tensor {name} has no place in transformers' {self.model_name}")
            slot = self._slot(*key)
            value = thunk()
            if tuple(slot.shape) != tuple(value.shape):
                raise VerifyError(f"{what} tensor {name} has shape {list(value.shape)}, the model expects "
                                  f"{list(slot.shape)}")
            slot.copy_(value.to(slot.dtype))
            filled.add(key)
        missing = sorted(self._needed() - filled, key=str)
        if missing:
            key, index = missing[0]
            part = f" (expert {index[0]} {index[1]})" if index else ""
            raise VerifyError(f"{what} has no tensor for model parameter {key}{part}")

    def _target(self, name: str) -> tuple[str, tuple | None] | None:
        if name in self.state:
            return name, None
        m = _EXPERT_RE.match(name)
        if not m:
            return None
        prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
        fused = f"{prefix}.down_proj" if part == "down_proj" else f"{prefix}.gate_up_proj"
        return (fused, (e, part)) if fused in self.state else None


def compare_logits(view: CanonicalView, dest: Destination, config: dict, *, min_cosine: float,
                   min_top1_agreement: float, max_kl: float, device: str | torch.device = "cpu") -> LogitsResult:
    """Raises VerifyError when the models cannot be built or filled; threshold misses are `problems`."""
    from converter.models.family import family_of

    try:
        family = family_of(config)
    except MxconvError as e:
        raise VerifyError(f"--logits: {e.message}") from None
    if not family.logits:
        raise VerifyError(f"--logits is not available for {family.name} models: transformers has no model "
                          "class for them")
    config_class, model_class = require_transformers((family.logits["config"], family.logits["model"]))
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    try:
        hf_config = config_class(**cfg)
        hf_config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = model_class(hf_config).to(torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a config it cannot take
        raise VerifyError(f"transformers cannot build {model_class.__name__} from this config.json: {e}") from None
    filler = _ModelFiller(model, int(config.get("num_hidden_layers", 0)), model_class.__name__)
    tokens = fixed_token_ids(int(config["vocab_size"]))
    model.to(device)
    outputs = []
    for what, tensors in (("SRC", source_tensors(view)), ("DST", destination_tensors(dest))):
        filler.fill(tensors, what)
        with torch.no_grad():
            outputs.append(model(tokens.to(device), use_cache=False).logits.float().reshape(-1, hf_config.vocab_size))
    return logits_metrics(outputs[0], outputs[1], min_cosine=min_cosine, min_top1_agreement=min_top1_agreement,
                          max_kl=max_kl)


def logits_metrics(ref: torch.Tensor, got: torch.Tensor, *, min_cosine: float, min_top1_agreement: float,
                   max_kl: float) -> LogitsResult:
    """Metrics of logits `got` against `ref`, both [positions, vocab]; pure."""
    cos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).double().mean()
    logp, logq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    r = LogitsResult(float(cos.mean()), float(cos.min()), float(top1), float(kl.mean()), float(kl.max()),
                     ref.shape[0])
    if not math.isfinite(r.cosine) or r.cosine < min_cosine:
        r.problems.append(f"mean logits cosine {r.cosine:.5f} < {min_cosine}")
    if not math.isfinite(r.top1_agreement) or r.top1_agreement < min_top1_agreement:
        r.problems.append(f"top-1 agreement {100 * r.top1_agreement:.1f} % < {100 * min_top1_agreement:.0f} %")
    if not math.isfinite(r.kl) or r.kl > max_kl:
        r.problems.append(f"mean KL(source || destination) {r.kl:.5f} > {max_kl}")
    return r
