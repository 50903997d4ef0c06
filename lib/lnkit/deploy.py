"""The deployment cost model (paper Section 2.1): parameters, KV-cache capacity and a roofline of time.

Puzzle chose LN-Super's and LN-Ultra's blocks under deployment constraints: LN-Super for one H100 at
TP1 (">= 2.17x the throughput of Llama-3.3-70B-Instruct even at TP4", "~300k cached tokens at FP8"),
LN-Ultra for one 8xH100 node ("1.71x lower latency than Llama-3.1-405B-Instruct", "up to 3M cached
tokens in FP8 and 600k in BF16"). This module recomputes those figures from the released per-layer
``block_configs`` with arithmetic a reader can check by hand, and :func:`paper_claims` puts each
reproduced figure beside the paper's, with the assumptions it needs.

It works on plain config dicts (a released ``config.json``, a Llama ``config.json``, anything with
``to_dict()``, a name from :data:`BUILTIN_CONFIGS` or a path), so it does not import ``lnkit.model``.
A Llama config without ``block_configs`` is a stack of identical attention + SwiGLU layers.

What the model counts, and what it leaves out (each a deliberate simplification):
- Memory: every weight in ``weight_dtype`` (embeddings and ``lm_head`` included; real FP8 checkpoints
  often keep those two in BF16, which costs ``2 x vocab x hidden`` bytes more), the KV cache in
  ``kv_dtype``, and a ``reserve_fraction`` of the memory for activations, CUDA graphs and the runtime.
  GPU memory is the datasheet figure in decimal GB (80 GB = 80e9 bytes); an H100 actually exposes
  81,559 MiB (85.5e9 bytes), 7% more, so the capacities here are on the low side.
- Time: each sub-block is a roofline ``max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth)``
  on one tensor-parallel rank with perfect sharding (heads, KV heads and FFN width split evenly;
  with ``tp`` above a layer's KV-head count each rank keeps one KV head of its own, as vLLM and
  Megatron replicate them: ``max(kv_heads, tp)`` heads per layer are cached and read), plus one
  ring all-reduce after every sub-block that has weights when ``tp > 1``. No-op sub-blocks cost
  nothing. Kernel launch gaps, scheduling, sampling, and the overlap of communication with compute
  are not modelled; :class:`Assumptions` holds the efficiency factors, stated and overridable.
- FP8 compute: FP8 weights run on FP8 tensor cores (W8A8, as the paper's vLLM FP8 path does) where
  the GPU has them. A100 has none: FP8 weights there are weight-only FP8, computed in BF16 (the stated
  fall-back rule), and asking for ``compute_dtype="fp8"`` on an A100 is an error. Attention
  (QK^T and AV) runs in BF16 whatever the KV dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from lnkit.blocks import parse_block_configs
from lnkit.params import ParamError, StageParams, param

REFERENCE_DIR = Path(__file__).parent / "reference_configs"
CLAIM_TOLERANCE = 0.10  # a reproduced figure within +-10% of the paper's counts as reproduced

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class GPU:
    """One accelerator's public spec figures (dense tensor-core peaks, not the 2:4-sparsity ones)."""

    name: str
    memory_gb: float  # HBM capacity, decimal GB as the datasheet states it
    hbm_tb_s: float  # HBM bandwidth, TB/s
    bf16_tflops: float  # dense BF16 tensor-core peak
    fp8_tflops: float | None  # dense FP8 tensor-core peak; None: the GPU has no FP8 tensor cores
    nvlink_gb_s: float  # NVLink bandwidth per GPU, GB/s, both directions together (datasheet figure)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    def peak_flops(self, compute_dtype: str) -> float:
        if compute_dtype == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores: FP8 compute is not available; "
                                 "use compute_dtype='bf16' (FP8 weights are then weight-only, computed in BF16)")
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12


# Vendor datasheet figures (SXM form factor). The datasheets print tensor-core peaks "with sparsity";
# the dense peaks used here are half of those.
# - H100 SXM5 80 GB: NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS
#   and FP8 3,958 TFLOPS with sparsity (989 / 1,979 dense), NVLink 900 GB/s.
# - H200 SXM 141 GB: NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, same tensor cores
#   as H100 SXM (BF16 989, FP8 1,979 dense), NVLink 900 GB/s.
# - A100 SXM 80 GB: NVIDIA A100 Tensor Core GPU datasheet: 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS
#   dense (624 with sparsity), no FP8 tensor cores (Ampere), NVLink 600 GB/s.
GPUS = {
    "H100": GPU("H100 SXM5 80GB", 80, 3.35, 989.0, 1979.0, 900),
    "H200": GPU("H200 SXM 141GB", 141, 4.8, 989.0, 1979.0, 900),
    "A100": GPU("A100 SXM 80GB", 80, 2.039, 312.0, None, 600),
}


def get_gpu(name: str | GPU) -> GPU:
    """A catalogue entry by name (case-insensitive); an unknown name is an error listing the catalogue.

    >>> get_gpu("h100").memory_gb
    80
    >>> get_gpu("B300")
    Traceback (most recent call last):
    ...
    KeyError: "unknown GPU 'B300'; the catalogue has: H100 (H100 SXM5 80GB), H200 (H200 SXM 141GB), A100 (A100 SXM 80GB)"
    """
    if isinstance(name, GPU):
        return name
    for key, gpu in GPUS.items():
        if str(name).strip().lower() in (key.lower(), gpu.name.lower()):
            return gpu
    listing = ", ".join(f"{k} ({g.name})" for k, g in GPUS.items())
    raise KeyError(f"unknown GPU {name!r}; the catalogue has: {listing}")


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# --------------------------------------------------------------------------- model shapes

# The parents, from their public config.json shapes (Llama-3.3-70B-Instruct, Llama-3.1-405B-Instruct).
BUILTIN_CONFIGS = {
    "Llama-3.3-70B": {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
                      "vocab_size": 128256, "tie_word_embeddings": False},
    "Llama-3.1-405B": {"model_type": "llama", "hidden_size": 16384, "num_hidden_layers": 126,
                       "num_attention_heads": 128, "num_key_value_heads": 8, "intermediate_size": 53248,
                       "vocab_size": 128256, "tie_word_embeddings": False},
}
REFERENCE_FILES = {
    "LN-Super": "llama-3_3-nemotron-super-49b-v1.config.json",
    "LN-Ultra": "llama-3_1-nemotron-ultra-253b-v1.config.json",
}
CONFIG_NAMES = list(REFERENCE_FILES) + list(BUILTIN_CONFIGS)


def _find_config_json(folder: Path) -> Path:
    """``folder/config.json``, else the last (in sorted order, so the latest stage) below it."""
    if (folder / "config.json").is_file():
        return folder / "config.json"
    found = sorted(folder.rglob("config.json"))
    if not found:
        raise FileNotFoundError(f"no config.json in {folder} or below it")
    return found[-1]


def load_config(source) -> dict:
    """A config dict from a name in :data:`CONFIG_NAMES`, a config.json path, a folder holding one
    (a run folder: its latest stage's model), a dict, or anything with ``to_dict()``."""
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict"):
        return source.to_dict()
    if source in REFERENCE_FILES:
        return json.loads((REFERENCE_DIR / REFERENCE_FILES[source]).read_text())
    if source in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[source])
    p = Path(source)
    if p.is_dir():
        p = _find_config_json(p)
    if not p.is_file():
        raise FileNotFoundError(f"config {source!r} is neither a known name ({', '.join(CONFIG_NAMES)}) "
                                "nor a config.json file nor a folder holding one")
    return json.loads(p.read_text())


@dataclass(frozen=True)
class Layer:
    """One decoder layer as the cost model sees it: sub-block kinds and sizes."""

    index: int
    attention: str  # "attention", "linear" or "no_op"
    kv_heads: int  # 0 unless attention == "attention"
    ffn: str  # "ffn", "linear" or "no_op"
    ffn_width: int  # 0 unless ffn == "ffn"


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    tied: bool
    layers: tuple[Layer, ...]


def model_shape(config) -> Shape:
    """The shapes that cost memory and time, from any config :func:`load_config` accepts."""
    c = load_config(config)
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    n = c["num_hidden_layers"]
    head_dim = c.get("head_dim") or hidden // heads
    if c.get("block_configs") is not None:
        blocks = parse_block_configs(c["block_configs"], n, heads)
        layers = tuple(Layer(i, b.attention.kind, b.attention.num_kv_heads(heads), b.ffn.kind, b.ffn.width(hidden))
                       for i, b in enumerate(blocks))
    else:
        kv = c.get("num_key_value_heads") or heads
        layers = tuple(Layer(i, "attention", kv, "ffn", c["intermediate_size"]) for i in range(n))
    return Shape(hidden, heads, head_dim, c["vocab_size"], bool(c.get("tie_word_embeddings", False)), layers)


# --------------------------------------------------------------------------- parameters and memory


def attention_params(s: Shape, layer: Layer) -> int:
    """Weights of one attention sub-block, its RMSNorm included; a no-op has none (not even a norm)."""
    if layer.attention == "no_op":
        return 0
    if layer.attention == "linear":
        return s.hidden * s.hidden + s.hidden
    q_o = 2 * s.hidden * s.heads * s.head_dim
    k_v = 2 * s.hidden * layer.kv_heads * s.head_dim
    return q_o + k_v + s.hidden


def ffn_params(s: Shape, layer: Layer) -> int:
    """Weights of one FFN sub-block (SwiGLU: gate, up, down), its RMSNorm included."""
    if layer.ffn == "no_op":
        return 0
    if layer.ffn == "linear":
        return s.hidden * s.hidden + s.hidden
    return 3 * s.hidden * layer.ffn_width + s.hidden


def count_parameters(config) -> int:
    """Embeddings, ``lm_head`` unless tied, the final norm, and every layer's sub-blocks.

    >>> tiny = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...         "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10}
    >>> count_parameters(tiny)  # embed+head 2*10*8 + final norm 8, q,o 2*8*8 + k,v 2*8*4 + norm 8, ffn 3*8*16 + 8
    760
    """
    s = model_shape(config)
    emb = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden
    return emb + sum(attention_params(s, L) + ffn_params(s, L) for L in s.layers)


def kv_bytes_per_token(config, kv_dtype: str = "bf16", tp: int = 1) -> int:
    """K and V for one token across the model on one replica of ``tp`` GPUs: ``2 x kv_heads x head_dim x
    bytes`` per attention layer, with ``max(kv_heads, tp)`` heads where ``tp`` exceeds a layer's KV heads
    (each rank keeps a replica of one).

    Linear-replacement and no-op attention layers keep no cache.

    >>> cfg = {"hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
    ...        "intermediate_size": 16, "vocab_size": 10}
    >>> kv_bytes_per_token(cfg, "fp8"), kv_bytes_per_token(cfg, "fp8", tp=2)
    (24, 48)
    """
    s = model_shape(config)
    return sum(2 * max(L.kv_heads, tp) * s.head_dim for L in s.layers
               if L.attention == "attention") * dtype_bytes(kv_dtype)


def memory_plan(config, gpu="H100", num_gpus: int = 1, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                reserve_fraction: float = 0.1) -> dict:
    """Where the memory of ``num_gpus`` GPUs goes: weights, the reserve, and KV cache for how many tokens.
    The GPUs hold one replica, tensor-parallel across them (KV heads replicate past ``num_gpus``).

    The reserve (activations, CUDA graphs, the runtime's own buffers) is a fraction of all memory, like
    vLLM's ``gpu_memory_utilization = 1 - reserve_fraction``. Weights that do not fit leave 0 tokens.
    """
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction={reserve_fraction}: expected 0 <= reserve_fraction < 1")
    if num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus}: expected at least 1")
    g = get_gpu(gpu)
    total = g.memory_bytes * num_gpus
    weights = count_parameters(config) * dtype_bytes(weight_dtype)
    reserve = reserve_fraction * total
    free = total - reserve - weights
    per_token = kv_bytes_per_token(config, kv_dtype, num_gpus)  # one replica: num_gpus is its TP degree
    return {"total_bytes": total, "weight_bytes": weights, "reserve_bytes": reserve,
            "kv_free_bytes": max(free, 0.0), "kv_bytes_per_token": per_token,
            "weights_fit": free >= 0, "kv_tokens": int(max(free, 0.0) // per_token) if per_token else 0}


def kv_cache_capacity(config, gpu="H100", num_gpus: int = 1, weight_dtype: str = "bf16",
                      kv_dtype: str = "bf16", reserve_fraction: float = 0.1) -> int:
    """Tokens of KV cache that fit after the weights and the reserve (0 if the weights do not fit)."""
    return memory_plan(config, gpu, num_gpus, weight_dtype, kv_dtype, reserve_fraction)["kv_tokens"]


def gpus_needed(config, gpu="H100", weight_dtype: str = "bf16", reserve_fraction: float = 0.1) -> int:
    """The fewest GPUs whose memory, less the reserve, holds the weights (with no room for KV yet).

    >>> gpus_needed("LN-Ultra", "H100", "fp8", 0.1), gpus_needed("Llama-3.1-405B", "H100", "bf16", 0.1)
    (4, 12)
    """
    usable = get_gpu(gpu).memory_bytes * (1 - reserve_fraction)
    return max(1, math.ceil(count_parameters(config) * dtype_bytes(weight_dtype) / usable))


# --------------------------------------------------------------------------- roofline time


@dataclass(frozen=True)
class Assumptions:
    """What the roofline assumes beyond the datasheet; every figure here is a judgement, not a measurement.

    flops_efficiency: share of the dense tensor-core peak a large GEMM reaches (60% is a usual sustained
        figure for BF16/FP8 GEMMs on H100; small decode GEMMs are memory-bound, so this matters for prefill).
    bandwidth_efficiency: share of the HBM peak a streaming kernel reaches (80-90% measured on H100).
    interconnect_efficiency: share of one NVLink direction (half the datasheet's bidirectional figure)
        that NCCL's ring all-reduce achieves as bus bandwidth.
    allreduce_latency_s: fixed cost of one all-reduce (launch and synchronisation across the node).
    activation_bytes: bytes per activation element moved between GPUs (BF16).
    decode_points: decode step time is averaged over this many context lengths between prompt and end.
    """

    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    interconnect_efficiency: float = 0.7
    allreduce_latency_s: float = 10e-6
    activation_bytes: int = 2
    decode_points: int = 8

    def __post_init__(self):
        for name in ("flops_efficiency", "bandwidth_efficiency", "interconnect_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Assumptions.{name}={v}: expected a fraction in (0, 1]")
        if self.allreduce_latency_s < 0 or self.decode_points < 1:
            raise ValueError("Assumptions: allreduce_latency_s must be >= 0 and decode_points >= 1")


def allreduces_per_layer(layer: Layer, tp: int) -> int:
    """Row-parallel outputs are summed across ranks once per sub-block that has weights: 2 for a full
    layer, 1 for a layer with one no-op sub-block (a fused-FFN layer of LN-Ultra), 0 for a no-op layer
    or at TP1. A linear replacement is a sharded Linear too, so it counts.

    >>> allreduces_per_layer(Layer(0, "attention", 8, "ffn", 64), 4), allreduces_per_layer(Layer(0, "no_op", 0, "ffn", 64), 4)
    (2, 1)
    """
    if tp <= 1:
        return 0
    return (layer.attention != "no_op") + (layer.ffn != "no_op")


def allreduce_seconds(message_bytes: float, gpu: GPU, tp: int, a: Assumptions) -> float:
    """Ring all-reduce: each rank sends and receives ``2 (tp-1)/tp`` of the message, plus a fixed latency."""
    if tp <= 1:
        return 0.0
    bw = gpu.nvlink_gb_s / 2 * 1e9 * a.interconnect_efficiency
    return a.allreduce_latency_s + 2 * (tp - 1) / tp * message_bytes / bw


def _roofline(flops: float, gemm_peak: float, attn_flops: float, attn_peak: float, nbytes: float,
              gpu: GPU, tp: int, a: Assumptions) -> float:
    compute = flops / (gemm_peak * a.flops_efficiency * tp) + attn_flops / (attn_peak * a.flops_efficiency * tp)
    memory = nbytes / (gpu.hbm_tb_s * 1e12 * a.bandwidth_efficiency * tp)
    return max(compute, memory)


def _subblock_seconds(s: Shape, L: Layer, part: str, tokens: int, pairs: float, kv_read: float,
                      gpu: GPU, tp: int, wbytes: int, kvbytes: int, gemm_peak: float, a: Assumptions) -> tuple:
    """(compute-or-memory seconds, all-reduce seconds) of one sub-block processing ``tokens`` tokens.

    ``pairs`` is the number of (query, key) pairs attended, summed over the batch; ``kv_read`` the
    cached tokens whose K and V come from HBM (decode reads them all; prefill's flash attention keeps
    its tiles on chip, so 0). The K and V of the ``tokens`` new tokens are written.
    """
    params = attention_params(s, L) if part == "attention" else ffn_params(s, L)
    if params == 0:
        return 0.0, 0.0
    act = a.activation_bytes
    nbytes = params * wbytes + 2 * tokens * s.hidden * act  # weights, read once, and activations in/out
    attn_flops = 0.0
    if part == "attention" and L.attention == "attention":
        kv_row = 2 * max(L.kv_heads, tp) * s.head_dim * kvbytes  # K and V of one token (replicated past tp)
        attn_flops = 2 * 2 * s.heads * s.head_dim * pairs  # QK^T and AV
        nbytes += kv_row * (tokens + kv_read)
    t = _roofline(2 * params * tokens, gemm_peak, attn_flops, gpu.bf16_tflops * 1e12, nbytes, gpu, tp, a)
    return t, allreduce_seconds(tokens * s.hidden * act, gpu, tp, a)


def layer_costs(config, gpu="H100", tp: int = 1, batch_size: int = 1, prompt_len: int = 1024,
                output_len: int = 1024, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                compute_dtype: str | None = None, assumptions: Assumptions | None = None) -> list[dict]:
    """Per layer: prefill seconds and mean decode-step seconds of attention, FFN and all-reduces.

    Prefill processes ``batch_size x prompt_len`` tokens at once (causal attention: ``prompt_len^2 / 2``
    pairs per sequence). A decode step processes ``batch_size`` tokens, each attending to its whole
    context; the step time is averaged over ``decode_points`` context lengths from ``prompt_len`` to
    ``prompt_len + output_len``. The last row, layer ``"head"``, is the final norm and ``lm_head``
    (logits for one token per sequence in both phases; its vocabulary all-gather is not counted).
    """
    a = assumptions or Assumptions()
    g, s = get_gpu(gpu), model_shape(config)
    compute_dtype = compute_dtype or ("fp8" if weight_dtype == "fp8" and g.fp8_tflops else "bf16")
    if compute_dtype not in ("bf16", "fp16", "fp8"):
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected 'bf16', 'fp16' or 'fp8' (tensor-core peaks)")
    gemm_peak = g.peak_flops(compute_dtype)
    wb, kb = dtype_bytes(weight_dtype), dtype_bytes(kv_dtype)
    B, P = batch_size, prompt_len
    ctxs = [P + (i + 0.5) * output_len / a.decode_points for i in range(a.decode_points)]
    rows = []
    for L in s.layers:
        row = {"layer": L.index, "attention": L.attention, "kv_heads": L.kv_heads, "ffn": L.ffn,
               "ffn_width": L.ffn_width, "allreduces": allreduces_per_layer(L, tp)}
        for part in ("attention", "ffn"):
            t, c = _subblock_seconds(s, L, part, B * P, B * P * (P + 1) / 2, 0.0, g, tp, wb, kb, gemm_peak, a)
            row[f"prefill_{part}_s"], row[f"prefill_{part}_comm_s"] = t, c
            steps = [_subblock_seconds(s, L, part, B, B * ctx, B * ctx, g, tp, wb, kb, gemm_peak, a) for ctx in ctxs]
            row[f"decode_{part}_s"] = sum(t for t, _ in steps) / len(steps)
            row[f"decode_{part}_comm_s"] = sum(c for _, c in steps) / len(steps)
        rows.append(row)
    head = s.vocab * s.hidden + s.hidden
    t_head = _roofline(2 * head * B, gemm_peak, 0.0, 1.0, head * wb, g, tp, a)
    rows.append({"layer": "head", "attention": "-", "kv_heads": 0, "ffn": "-", "ffn_width": 0, "allreduces": 0,
                 **{f"{ph}_{part}_{k}": 0.0 for ph in ("prefill", "decode") for part in ("attention", "ffn")
                    for k in ("s", "comm_s")},
                 "prefill_head_s": t_head, "decode_head_s": t_head})
    for r in rows:
        for ph in ("prefill", "decode"):
            r[f"{ph}_s"] = (r[f"{ph}_attention_s"] + r[f"{ph}_attention_comm_s"] + r[f"{ph}_ffn_s"]
                            + r[f"{ph}_ffn_comm_s"] + r.get(f"{ph}_head_s", 0.0))
    return rows


def estimate(config, gpu="H100", tp: int = 1, batch_size: int = 1, prompt_len: int = 1024,
             output_len: int = 1024, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
             reserve_fraction: float = 0.1, compute_dtype: str | None = None,
             assumptions: Assumptions | None = None) -> dict:
    """Roofline time of one model replica on ``tp`` GPUs serving ``batch_size`` requests together.

    ``latency_s`` is one request from prompt to last token (prefill, then ``output_len`` decode steps);
    ``throughput_tok_s`` counts generated tokens over that time for the whole batch, and
    ``per_gpu_tok_s`` divides it by ``tp``. ``fits`` says whether the weights and the batch's whole
    KV cache fit in the ``tp`` GPUs after the reserve; an estimate that does not fit is still computed.
    """
    rows = layer_costs(config, gpu, tp, batch_size, prompt_len, output_len, weight_dtype, kv_dtype,
                       compute_dtype, assumptions)
    mem = memory_plan(config, gpu, tp, weight_dtype, kv_dtype, reserve_fraction)
    prefill = sum(r["prefill_s"] for r in rows)
    step = sum(r["decode_s"] for r in rows)
    latency = prefill + output_len * step
    need = batch_size * (prompt_len + output_len)
    return {"prefill_s": prefill, "decode_step_s": step, "latency_s": latency,
            "throughput_tok_s": batch_size * output_len / latency,
            "per_gpu_tok_s": batch_size * output_len / latency / tp,
            "decode_tok_s": batch_size / step, "allreduces": sum(r["allreduces"] for r in rows),
            "kv_tokens_needed": need, "kv_tokens_capacity": mem["kv_tokens"],
            "fits": mem["weights_fit"] and need <= mem["kv_tokens"],
            "max_batch": mem["kv_tokens"] // (prompt_len + output_len), "layers": rows}


# --------------------------------------------------------------------------- the paper's claims


def _within(reproduced: float, paper: float, at_least: bool = False) -> bool:
    if at_least:
        return reproduced >= paper * (1 - CLAIM_TOLERANCE)
    return abs(reproduced - paper) <= CLAIM_TOLERANCE * paper


def _row(claim, paper, reproduced, unit, assumptions, at_least=False) -> dict:
    return {"claim": claim, "paper_figure": paper, "reproduced_figure": reproduced, "unit": unit,
            "assumptions": assumptions,
            "within_tolerance": None if paper is None else _within(reproduced, paper, at_least)}


# The scenario for the throughput and latency comparisons. The paper summary gives no batch size or
# sequence lengths for them, so these are this module's choice, stated here and in the rows.
COMPARE_PROMPT, COMPARE_OUTPUT, COMPARE_MAX_BATCH = 1024, 1024, 256


def best_throughput(config, gpu, tp, weight_dtype="fp8", kv_dtype="fp8", reserve_fraction=0.1,
                    prompt_len=COMPARE_PROMPT, output_len=COMPARE_OUTPUT, max_batch=COMPARE_MAX_BATCH,
                    assumptions=None) -> dict:
    """The estimate at the largest batch (up to ``max_batch``) whose KV cache fits: a serving engine
    fills memory with requests, so memory capacity decides throughput as much as speed does."""
    cap = memory_plan(config, gpu, tp, weight_dtype, kv_dtype, reserve_fraction)["kv_tokens"]
    batch = min(max_batch, cap // (prompt_len + output_len))
    if batch < 1:
        return {"batch_size": 0, "throughput_tok_s": 0.0, "per_gpu_tok_s": 0.0, "latency_s": float("inf")}
    est = estimate(config, gpu, tp, batch, prompt_len, output_len, weight_dtype, kv_dtype, reserve_fraction,
                   assumptions=assumptions)
    return {"batch_size": batch, **{k: est[k] for k in ("throughput_tok_s", "per_gpu_tok_s", "latency_s")}}


def throughput_ratios(scenarios=((1024, 1024), (128, 1024), (1024, 128), (1024, 8192)),
                      max_batches=(64, COMPARE_MAX_BATCH), assumptions: Assumptions | None = None) -> list[dict]:
    """LN-Super TP1 against Llama-3.3-70B TP4 (FP8, one H100 per TP rank) over (prompt, output) lengths
    and batch caps: how much the 2.17x comparison depends on a scenario the summary does not give."""
    rows = []
    for prompt, output in scenarios:
        for cap in max_batches:
            sup = best_throughput("LN-Super", "H100", 1, prompt_len=prompt, output_len=output, max_batch=cap,
                                  assumptions=assumptions)
            ref = best_throughput("Llama-3.3-70B", "H100", 4, prompt_len=prompt, output_len=output, max_batch=cap,
                                  assumptions=assumptions)
            rows.append({"prompt_len": prompt, "output_len": output, "max_batch": cap,
                         "LN-Super batch": sup["batch_size"], "70B TP4 batch": ref["batch_size"],
                         "LN-Super tok/s/GPU": sup["per_gpu_tok_s"], "70B TP4 tok/s/GPU": ref["per_gpu_tok_s"],
                         "ratio per GPU": sup["per_gpu_tok_s"] / ref["per_gpu_tok_s"]})
    return rows


def paper_claims(reserve_fraction: float = 0.0, assumptions: Assumptions | None = None) -> list[dict]:
    """Each Section 2.1 deployment claim beside what this model computes, with the assumptions it needs.

    Capacity claims are computed with ``reserve_fraction`` (default 0: the paper says "up to", an upper
    bound with no memory set aside; the notebook also shows them at 10%). The paper summary says "at
    FP8" / "in BF16" without separating weights from KV cache; the rows use one precision for both,
    and LN-Super could not run with BF16 weights on one H100 at all (99.7 GB > 80 GB).
    """
    r = reserve_fraction
    res = f"reserve {r:.0%} of memory, GPU memory as datasheet decimal GB"

    def capacity_row(claim, paper, name, gpus, wdt, kdt, note=""):
        cap = kv_cache_capacity(name, "H100", gpus, wdt, kdt, r)
        at10 = kv_cache_capacity(name, "H100", gpus, wdt, kdt, 0.1)
        gib = kv_cache_capacity(name, replace(GPUS["H100"], memory_gb=80 * 2**30 / 1e9), gpus, wdt, kdt, r)
        rel = (lambda v: f" ({v / paper - 1:+.0%})") if paper else (lambda v: "")
        return _row(claim, paper, cap, "tokens", f"{wdt.upper()} weights and {kdt.upper()} KV; {res}; "
                    f"with 10% reserved instead: {at10:,}{rel(at10)}; counting 80 GiB per GPU instead of "
                    f"80 GB: {gib:,}{rel(gib)}{note}")

    rows = [
        capacity_row("LN-Super: ~300k cached tokens at FP8 on one H100", 300_000, "LN-Super", 1, "fp8", "fp8",
                     "; BF16 weights (99.7 GB) would not fit at all"),
        capacity_row("(parent) Llama-3.3-70B: cached tokens at FP8 on one H100", None, "Llama-3.3-70B", 1,
                     "fp8", "fp8", "; no paper figure: the parent LN-Super was built to beat"),
        capacity_row("LN-Ultra: up to 3M cached tokens in FP8 on an 8xH100 node", 3_000_000, "LN-Ultra", 8,
                     "fp8", "fp8"),
        capacity_row("(parent) Llama-3.1-405B: cached tokens in FP8 on an 8xH100 node", None, "Llama-3.1-405B", 8,
                     "fp8", "fp8"),
    ]
    rows += [
        capacity_row("LN-Ultra: up to 600k cached tokens in BF16 on an 8xH100 node", 600_000, "LN-Ultra", 8,
                     "bf16", "bf16", "; not reproduced under either memory unit; BF16 weights with FP8 KV "
                     f"give {kv_cache_capacity('LN-Ultra', 'H100', 8, 'bf16', 'fp8', r):,}"),
        capacity_row("(parent) Llama-3.1-405B: cached tokens in BF16 on an 8xH100 node", None, "Llama-3.1-405B", 8,
                     "bf16", "bf16", "; 0: its BF16 weights (812 GB) do not fit in 640 GB"),
    ]
    scen = (f"roofline; FP8 weights (FP8 compute) and FP8 KV; prompt {COMPARE_PROMPT}, output {COMPARE_OUTPUT}; "
            f"each at the largest batch <= {COMPARE_MAX_BATCH} whose KV fits after a 10% reserve")
    sup = best_throughput("LN-Super", "H100", 1, assumptions=assumptions)
    ref = best_throughput("Llama-3.3-70B", "H100", 4, assumptions=assumptions)
    rows.append(_row(">= 2.17x throughput: LN-Super TP1 vs Llama-3.3-70B TP4 (per GPU)", 2.17,
                     sup["per_gpu_tok_s"] / ref["per_gpu_tok_s"], "x",
                     f"{scen}; batches {sup['batch_size']} vs {ref['batch_size']}; throughput per GPU "
                     "(the summary does not say per GPU or per replica)", at_least=True))
    rows.append(_row("LN-Super TP1 vs Llama-3.3-70B TP4, per replica (1 GPU vs 4 GPUs)", None,
                     sup["throughput_tok_s"] / ref["throughput_tok_s"], "x", f"{scen}; whole-replica throughput"))
    ult = estimate("LN-Ultra", "H100", 8, 1, COMPARE_PROMPT, COMPARE_OUTPUT, "fp8", "fp8", assumptions=assumptions)
    big = estimate("Llama-3.1-405B", "H100", 8, 1, COMPARE_PROMPT, COMPARE_OUTPUT, "fp8", "fp8",
                   assumptions=assumptions)
    rows.append(_row("LN-Ultra: 1.71x lower latency than Llama-3.1-405B (8xH100, TP8)", 1.71,
                     big["latency_s"] / ult["latency_s"], "x",
                     f"roofline; FP8 weights and KV; batch 1, prompt {COMPARE_PROMPT}, output {COMPARE_OUTPUT}; "
                     f"all-reduces per token {ult['allreduces']} vs {big['allreduces']}"))
    return rows


# --------------------------------------------------------------------------- the planner's explorer


def _size(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _gb(nbytes: float) -> str:
    v = nbytes / 1e9
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def explore(config_source, gpu="H100", num_gpus: int = 1, tp: int = 1, batch_size: int = 64,
            prompt_len: int = 1024, output_len: int = 1024, weight_dtype: str = "fp8", kv_dtype: str = "fp8",
            reserve_fraction: float = 0.1, assumptions: Assumptions | None = None) -> str:
    """The planner notebook's explore widget, as text: ``num_gpus`` GPUs serve ``num_gpus / tp`` replicas,
    each holding all the weights on its ``tp`` GPUs. It says so plainly, instead of printing times for a
    deployment that cannot run, when ``tp`` does not divide ``num_gpus``, when the weights do not fit one
    replica, or when the batch's KV cache does not (then the times are those of the largest batch that fits).

    >>> print(explore("LN-Ultra", "H100", num_gpus=1, tp=1, weight_dtype="bf16"))
    LN-Ultra's 253B weights need 507 GB in BF16: they do not fit on 1 x H100 (80 GB, 72 GB after the 10% reserve); at least 8 are needed.
    >>> print(explore("LN-Ultra", "H100", num_gpus=8, tp=2))
    LN-Ultra's 253B weights need 253 GB in FP8: they do not fit on 2 x H100 (160 GB, 144 GB after the 10% reserve); at least 4 are needed: raise TP to 4 or more (a replica holds all the weights on its TP GPUs).
    >>> print(explore("LN-Super", "H100", num_gpus=8, tp=3))
    TP3 does not divide 8 GPUs: the tensor-parallel degree must divide the number of GPUs (here 1, 2, 4 or 8).
    >>> print(explore("LN-Super", "H100", num_gpus=2, tp=1, batch_size=64))
    LN-Super: 49.9B parameters, 49.9 GB of weights in FP8; 2 x H100 at TP1: 2 replicas of 1 GPU.
    KV cache in FP8: 220,552 cached tokens per replica (100,352 bytes each), 441,104 in all.
    Batch 64 per replica, prompt 1,024 + output 1,024 tokens: latency 27.9 s per request; 2,350 tok/s per replica, 2,350 tok/s per GPU, 4,699 tok/s in all.
    """
    name = config_source if isinstance(config_source, str) and config_source in CONFIG_NAMES else (
        Path(config_source).name if isinstance(config_source, (str, Path)) else "the model")
    if num_gpus < 1 or tp < 1:
        return f"{num_gpus} GPUs at TP{tp}: both must be at least 1."
    if num_gpus % tp:
        ok = [str(d) for d in range(1, num_gpus + 1) if num_gpus % d == 0]
        choices = ok[0] if len(ok) == 1 else ", ".join(ok[:-1]) + " or " + ok[-1]
        return (f"TP{tp} does not divide {num_gpus} GPUs: the tensor-parallel degree must divide the number "
                f"of GPUs (here {choices}).")
    g = get_gpu(gpu)
    label = gpu if isinstance(gpu, str) else g.name
    config = load_config(config_source)
    n_params = count_parameters(config)
    plan = memory_plan(config, g, tp, weight_dtype, kv_dtype, reserve_fraction)  # one replica
    weights = f"{_size(n_params)} weights need {_gb(plan['weight_bytes'])} GB in {weight_dtype.upper()}"
    if not plan["weights_fit"]:
        need = gpus_needed(config, g, weight_dtype, reserve_fraction)
        after = (f", {tp * g.memory_gb * (1 - reserve_fraction):,.0f} GB after the {reserve_fraction:.0%} reserve"
                 if reserve_fraction else "")
        hint = (f": raise TP to {need} or more (a replica holds all the weights on its TP GPUs)"
                if num_gpus >= need else "")
        return (f"{name}'s {weights}: they do not fit on {tp} x {label} ({tp * g.memory_gb:,.0f} GB{after}); "
                f"at least {need} are needed{hint}.")
    replicas = num_gpus // tp
    lines = [f"{name}: {_size(n_params)} parameters, {_gb(plan['weight_bytes'])} GB of weights in "
             f"{weight_dtype.upper()}; {num_gpus} x {label} at TP{tp}: {replicas} replica{'s' * (replicas > 1)} "
             f"of {tp} GPU{'s' * (tp > 1)}.",
             f"KV cache in {kv_dtype.upper()}: {plan['kv_tokens']:,} cached tokens per replica "
             f"({plan['kv_bytes_per_token']:,} bytes each), {plan['kv_tokens'] * replicas:,} in all."]
    seq = prompt_len + output_len
    fits = plan["kv_tokens"] // seq
    lead = "Batch"
    if batch_size > fits:
        lines.append(f"Batch {batch_size} does not fit: its KV cache needs {batch_size * seq:,} tokens and a "
                     f"replica holds {plan['kv_tokens']:,}, " + (f"enough for {fits} request{'s' * (fits > 1)}" if fits
                                                                    else "not enough for one request")
                     + f" of {seq:,} tokens.")
        if fits == 0:
            return "\n".join(lines)
        batch_size, lead = fits, "At the largest batch that fits,"
    e = estimate(config, g, tp, batch_size, prompt_len, output_len, weight_dtype, kv_dtype, reserve_fraction,
                 assumptions=assumptions)
    lines.append(f"{lead} {batch_size} per replica, prompt {prompt_len:,} + output {output_len:,} tokens: latency "
                 f"{e['latency_s']:.1f} s per request; {e['throughput_tok_s']:,.0f} tok/s per replica, "
                 f"{e['per_gpu_tok_s']:,.0f} tok/s per GPU, {e['throughput_tok_s'] * replicas:,.0f} tok/s in all.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the notebook's parameters


@dataclass
class PlannerParams(StageParams):
    """``notebooks/deployment_planner.ipynb``'s parameters (fields match its parameters cell)."""

    STAGE = "deployment_planner"
    config_source: str = param("LN-Super", f"one of {CONFIG_NAMES}, a config.json, or a run folder holding one")
    gpu: str = param("H100", "GPU from the catalogue", choices=list(GPUS))
    num_gpus: int = param(1, "GPUs in the deployment (KV capacity counts them all)", lo=1, hi=1024)
    tp: int = param(1, "tensor-parallel degree of one replica; must divide num_gpus", lo=1, hi=64)
    weight_dtype: str = param("fp8", "precision of the weights", choices=list(DTYPE_BYTES))
    kv_dtype: str = param("fp8", "precision of the KV cache", choices=list(DTYPE_BYTES))
    reserve_fraction: float = param(0.1, "memory set aside for activations and the runtime", lo=0.0, hi=0.9)
    batch_size: int = param(64, "requests decoded together by one replica", lo=1)
    prompt_len: int = param(1024, "prompt tokens per request", lo=1)
    output_len: int = param(1024, "generated tokens per request", lo=1)
    figures_dir: str = param("", "where to save figures; '' saves none")

    def check(self):
        if self.num_gpus % self.tp:
            raise ParamError(f"stage {self.STAGE}: tp={self.tp} does not divide num_gpus={self.num_gpus}")
        if self.config_source not in CONFIG_NAMES and not Path(self.config_source).exists():
            raise ParamError(f"stage {self.STAGE}: config_source={self.config_source!r} is not one of "
                             f"{CONFIG_NAMES} nor an existing path")
