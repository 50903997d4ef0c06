"""The rollout engine: sample completions for RL, with each token's id and log-probability.

One interface, :class:`RolloutEngine` (``sample``, ``load_weights``), two backends:

- ``torch`` (:class:`TorchEngine`, CPU or GPU): continuous batching over a preallocated KV cache. The model's
  own modules (norms, projections, MLPs) run inside a decode loop of our own: ``S`` cache slots, each holding
  one sequence; a slot whose sequence ends (stop token or length limit) is refilled with the next waiting
  prompt (a batched prefill of the admitted prompts), so short answers never leave the batch idle. Keys and
  values are written in place at each row's own position (no cache grows or is copied), attention reads only
  up to the longest live row, and no causal mask is built per step: where ``transformers``' ``generate`` and
  :func:`lnkit.generate.generate` spend most of a tiny model's step (``benchmarks/rollout_speed.py`` measures
  the ratio). When the queue is empty and half the slots are idle, the cache is compacted to the live rows.
  With ``fp8=True``, every linear layer runs on e4m3 quantise-dequantised weights (one scale per tensor) and
  inputs (one scale per token): the numerics of FP8 rollouts, emulated (paper Section 5.2.3). The fused
  q/k/v and gate/up matrices (and the FP8 copies) are rebuilt from the model at every ``sample`` call, so
  the engine always samples from the weights the trainer has now.
- ``vllm`` (GPU; :mod:`lnkit.rl.vllm_engine`): the same call on vLLM, ``quantization="fp8"`` for real FP8, and
  ``load_weights`` pushing the trainer's weights into the running engine (the paper's hot swap).

:func:`lnkit.rl.engines.make_engine` picks one by name.

Sampling is temperature + top-p from a seeded generator; each returned log-probability is the sampled token's
under the distribution actually sampled from (logits / temperature), what GRPO's ratio needs as pi_old when
the rollout policy is the trained one, and what the FP8 mismatch is measured against.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lnkit.data.chat import EOS_TEXT, EOT


@dataclass
class Rollout:
    """One sampled completion: its prompt's index in the call, the prompt's and completion's token ids, the
    completion's per-token log-probabilities, whether it ended with a stop token (which is included)."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False

    def text_ids(self) -> list[int]:
        """The completion's tokens without its stop token: what is decoded as the answer's text."""
        return self.completion_ids[:-1] if self.finished else self.completion_ids


class RolloutEngine:
    """What stage 07 needs of a backend."""

    def sample(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
               top_p: float = 1.0, seed: int = 0) -> list[Rollout]:
        """``n`` completions of each prompt (token ids), in order: prompt 0's n, then prompt 1's..."""
        raise NotImplementedError

    def load_weights(self, model) -> None:
        """Take the trainer's current weights."""
        raise NotImplementedError


def fp8_qdq(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``x`` rounded through float8 e4m3 and back, scaled so its largest magnitude maps to 448 (e4m3's
    largest): one scale for the tensor, or one per slice along ``dim`` kept (``dim=-1``: per token).

    >>> x = torch.tensor([[1.0, 0.1, -3.0], [100.0, 0.5, 0.0]])
    >>> (fp8_qdq(x, -1) - x).abs().max().item() < 0.07 * 100  # e4m3 keeps 3 mantissa bits
    True
    """
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (amax.float() / 448.0).clamp(min=1e-12)
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class _Linear:
    """A linear map as the rollout runs it: the module's own weight, or its FP8 emulation."""

    def __init__(self, module, fp8: bool, weight=None, bias=None):
        self.fp8 = fp8
        w = module.weight.detach() if weight is None else weight
        self.weight = fp8_qdq(w) if fp8 else w
        self.bias = getattr(module, "bias", None) if module is not None else bias

    @classmethod
    def fused(cls, modules, fp8: bool):
        """Several linear maps of the same input as one (their weights stacked; FP8: each keeps its own scale)."""
        weights = [fp8_qdq(m.weight.detach()) if fp8 else m.weight.detach() for m in modules]
        biases = [m.bias for m in modules]
        bias = None if all(b is None for b in biases) else torch.cat([b.detach() for b in biases])
        out = cls(None, False, weight=torch.cat(weights), bias=bias)
        out.fp8 = fp8  # inputs still quantised per token; the weights already are, one scale per part
        return out

    def __call__(self, x):
        return F.linear(fp8_qdq(x, -1) if self.fp8 else x, self.weight, self.bias)


class _Layer:
    """One decoder layer, read from a ``LlamaDecoderLayer`` or a ``NemotronNasDecoderLayer``."""

    def __init__(self, layer, fp8: bool):
        self.attention = getattr(layer, "attention_kind", "attention")
        self.ffn = getattr(layer, "ffn_kind", "ffn")
        if self.attention != "no_op":
            self.norm1 = layer.input_layernorm
        if self.attention == "attention":
            a = layer.self_attn
            self.qkv = _Linear.fused([a.q_proj, a.k_proj, a.v_proj], fp8)  # one matmul instead of three
            self.o = _Linear(a.o_proj, fp8)
            self.head_dim = a.head_dim
            self.heads = a.q_proj.out_features // a.head_dim
            self.kv_heads = a.k_proj.out_features // a.head_dim
            self.scaling = a.scaling
        elif self.attention == "linear":
            self.lin_attn = _Linear(layer.self_attn.linear_attn, fp8)
        if self.ffn != "no_op":
            self.norm2 = layer.post_attention_layernorm
        if self.ffn == "ffn":
            m = layer.mlp
            self.gate_up = _Linear.fused([m.gate_proj, m.up_proj], fp8)
            self.down = _Linear(m.down_proj, fp8)
            self.width = m.gate_proj.out_features
            self.act = m.act_fn
        elif self.ffn == "linear":
            self.lin_mlp = _Linear(layer.mlp.linear_mlp, fp8)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class TorchEngine(RolloutEngine):
    """The ``torch`` backend (see the module docstring). ``max_batch``: cache slots; ``admit_every``: refill
    once this many slots are free (or nothing else is running)."""

    def __init__(self, model, tok, *, max_batch: int = 64, admit_every: int | None = None, fp8: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected >= 1")
        self.tok, self.max_batch, self.fp8 = tok, max_batch, fp8
        self.admit_every = admit_every or max(1, max_batch // 8)
        self.stop = [i for i in (tok.convert_tokens_to_ids(t) for t in (EOT, EOS_TEXT)) if i is not None]
        self.load_weights(model)

    def load_weights(self, model) -> None:
        """Read the model's modules (another model, or new weights: fused and FP8 copies are rebuilt).
        :meth:`sample` calls it itself, so training between two calls needs nothing else."""
        self.model = model
        inner = model.model
        self.embed, self.final_norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer, self.fp8) for layer in inner.layers]
        self.device = next(model.parameters()).device
        self.dtype = self.embed.weight.dtype

    # ------------------------------------------------------------------------------------------ the model

    def _rope(self, length: int):
        pos = torch.arange(length, device=self.device)[None]
        cos, sin = self.rotary(self.embed.weight[:1, None], pos)
        return cos[0], sin[0]

    def _attend(self, layer: _Layer, i: int, h, pos, rows, prefill: bool):
        """Attention of ``h`` (R, T, hidden) at positions ``pos`` (R, T); writes K/V of cache rows ``rows``."""
        R, T, _ = h.shape
        d, nq, nkv = layer.head_dim, layer.heads, layer.kv_heads
        q, k, v = layer.qkv(h).split([nq * d, nkv * d, nkv * d], dim=-1)
        q = q.reshape(R, T, nq, d).transpose(1, 2)
        k = k.reshape(R, T, nkv, d).transpose(1, 2)
        v = v.reshape(R, T, nkv, d).transpose(1, 2)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        K, V = self.k_cache[i], self.v_cache[i]
        gqa = layer.heads != layer.kv_heads
        if prefill:  # the prompts alone, causal; right padding never attends back into real tokens
            K[rows, :, :T] = k
            V[rows, :, :T] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling, enable_gqa=gqa)
        else:  # one token per live slot, written at its own position, against its own history
            K[self.arange_s, :, pos[:, 0]] = k[:, :, 0]
            V[self.arange_s, :, pos[:, 0]] = v[:, :, 0]
            span = self.span
            out = F.scaled_dot_product_attention(q, K[:, :, :span], V[:, :, :span], attn_mask=self.mask[:, :, :, :span],
                                                 scale=layer.scaling, enable_gqa=gqa)
        return layer.o(out.transpose(1, 2).reshape(R, T, -1))

    def _forward(self, ids, pos, rows=None, prefill=False):
        h = self.embed(ids)
        a = 0
        for layer in self.layers:
            if layer.attention == "attention":
                h = h + self._attend(layer, a, layer.norm1(h), pos, rows, prefill)
                a += 1
            elif layer.attention == "linear":
                h = h + layer.lin_attn(layer.norm1(h))
            if layer.ffn == "ffn":
                gate, up = layer.gate_up(layer.norm2(h)).split(layer.width, dim=-1)
                h = h + layer.down(layer.act(gate) * up)
            elif layer.ffn == "linear":
                h = h + layer.lin_mlp(layer.norm2(h))
        return self.lm_head(self.final_norm(h))

    # ------------------------------------------------------------------------------------------ sampling

    def _pick(self, logits, temperature, top_p, gen):
        """(tokens, their log-probabilities under the distribution sampled from) for each row of ``logits``."""
        logits = logits.float()
        if temperature <= 0:
            tokens = logits.argmax(-1)
            return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
        logp = torch.log_softmax(logits / temperature, -1)
        probs = logp.exp()
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            keep = sp.cumsum(-1) - sp < top_p
            probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
            probs = probs / probs.sum(-1, keepdim=True)
            logp = probs.clamp(min=1e-30).log()
        # inverse-CDF sampling: one uniform per row (torch.multinomial draws a vocabulary of exponentials)
        cdf = probs.cumsum(-1)
        u = torch.rand(probs.shape[0], 1, generator=gen).to(probs.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u)[:, 0].clamp(max=probs.shape[-1] - 1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]

    @torch.no_grad()
    def sample(self, prompts, *, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0, progress=None):
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n={n}, max_new_tokens={max_new_tokens}: expected >= 1")
        jobs = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(n)]
        if not jobs:
            return []
        if any(not p for _, p in jobs):
            raise ValueError("an empty prompt cannot be sampled from")
        # The fused projections (and FP8 copies) are copies of the model's weights: read them again on every
        # call, so a trainer's updates since the last call are always what is sampled from.
        self.load_weights(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run(jobs, max_new_tokens, temperature, top_p, seed, progress)
        finally:
            if was_training:
                self.model.train()

    def _run(self, jobs, max_new, temperature, top_p, seed, progress):
        gen = torch.Generator().manual_seed(seed)
        S = min(self.max_batch, len(jobs))
        length = max(len(p) for _, p in jobs) + max_new
        self.cos, self.sin = self._rope(length)
        attn = [lay for lay in self.layers if lay.attention == "attention"]
        self.k_cache = [torch.zeros(S, lay.kv_heads, length, lay.head_dim, device=self.device, dtype=self.dtype)
                        for lay in attn]
        self.v_cache = [torch.zeros_like(c) for c in self.k_cache]
        queue = deque(range(len(jobs)))
        out = [Rollout(index=i, prompt_ids=p) for i, p in jobs]
        owner = [-1] * S  # the job in each slot
        lens = torch.zeros(S, dtype=torch.long, device=self.device)  # tokens in each slot's cache
        current = torch.zeros(S, dtype=torch.long, device=self.device)  # the token each slot feeds next

        def finish(slot):
            owner[slot] = -1
            if progress is not None:
                progress.update(1)

        def take(slots, tokens, logps):
            for s, t, lp in zip(slots, tokens.tolist(), logps.tolist()):
                r = out[owner[s]]
                r.completion_ids.append(t)
                r.logprobs.append(lp)
                if t in self.stop:
                    r.finished = True
                    finish(s)
                elif len(r.completion_ids) >= max_new:
                    finish(s)
            current[slots] = tokens

        def admit():
            free = [s for s in range(len(owner)) if owner[s] < 0][: len(queue)]
            if not free:
                return
            for s in free:
                owner[s] = queue.popleft()
            width = max(len(out[owner[s]].prompt_ids) for s in free)
            ids = torch.full((len(free), width), self.tok.pad_token_id or 0, dtype=torch.long)
            for r, s in enumerate(free):
                p = out[owner[s]].prompt_ids
                ids[r, : len(p)] = torch.tensor(p)
            rows = torch.tensor(free, device=self.device)
            plen = torch.tensor([len(out[owner[s]].prompt_ids) for s in free], device=self.device)
            pos = torch.arange(width, device=self.device)[None].expand(len(free), -1)
            logits = self._forward(ids.to(self.device), pos, rows=rows, prefill=True)
            last = logits[torch.arange(len(free), device=self.device), plen - 1]
            lens[rows] = plen
            take(free, *self._pick(last, temperature, top_p, gen))

        admit()
        while True:
            live = [s for s in range(len(owner)) if owner[s] >= 0]
            free = len(owner) - len(live)
            if queue and (free >= self.admit_every or not live):
                admit()
                continue
            if not live:
                break
            if not queue and len(live) <= len(owner) // 2 and len(owner) > 1:  # the tail: drop idle slots
                keep = torch.tensor(live, device=self.device)
                self.k_cache = [c[keep] for c in self.k_cache]
                self.v_cache = [c[keep] for c in self.v_cache]
                owner[:] = [owner[s] for s in live]
                lens, current = lens[keep], current[keep]
                continue
            alive = torch.tensor([o >= 0 for o in owner], device=self.device)
            pos = torch.where(alive, lens, torch.zeros_like(lens))  # an idle slot reruns position 0
            self.arange_s = torch.arange(len(owner), device=self.device)
            self.span = int(pos.max()) + 1
            keys = torch.arange(self.span, device=self.device)[None]
            self.mask = (keys <= pos[:, None])[:, None, None, :]
            logits = self._forward(torch.where(alive, current, torch.zeros_like(current))[:, None], pos[:, None])
            lens = lens + alive.long()
            tokens, logps = self._pick(logits[:, -1], temperature, top_p, gen)
            take(live, tokens[live], logps[live])
        return out

