"""Batched generation with a KV cache, for any transformers causal LM (the CPU / "hf" backend).

Prompts are sorted by length and run in left-padded batches: one prefill, then one token per step
through the model's cache, rows that have emitted a stop token are frozen, and the batch stops as soon as
every row is done. Greedy when ``temperature == 0``, else temperature + nucleus (top-p) sampling from a
seeded generator, so an evaluation is reproducible. ``backend="engine"`` runs the same call through the RL
rollout engine (faster; greedy output identical); at real scale it goes to vLLM (``backend="vllm"``, GPU only).
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch
from transformers import DynamicCache

from lnkit.data.chat import EOS_TEXT, EOT


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; older releases (vLLM pins one) call it
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # smallest prefix with mass >= top_p (the top token always kept)
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 64, backend: str = "hf",
             progress=None) -> list[dict]:
    """Complete each rendered prompt. Returns, per prompt, ``{"text", "tokens", "finished"}``."""
    if backend == "vllm":
        from lnkit.vllm_backend import generate_vllm  # GPU only; imported lazily

        return generate_vllm(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed)
    if backend == "engine":
        return _generate_engine(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, batch_size=batch_size, progress=progress)
    if backend != "hf":
        raise ValueError(f"backend {backend!r} not in ('hf', 'engine', 'vllm')")
    stop = [tok.convert_tokens_to_ids(t) for t in (EOT, EOS_TEXT)]
    pad = tok.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[dict] = [None] * len(prompts)  # type: ignore[list-item]
    gen = torch.Generator().manual_seed(seed)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        n = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, n - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, n - len(encoded[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kv = {_cache_kwarg(model): DynamicCache()}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       **kv).logits[:, -1, :].float()
        new = torch.zeros((len(idx), 0), dtype=torch.long, device=device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        last_pos = pos[:, -1]
        for _ in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, gen).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new = torch.cat([new, nxt[:, None]], 1)
            done |= torch.isin(nxt, torch.tensor(stop, device=device))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=mask.dtype, device=device)], 1)
            last_pos = last_pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                           use_cache=True, **kv).logits[:, -1, :].float()
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            finished = any(t in stop for t in toks)
            if finished:
                toks = toks[: next(j for j, t in enumerate(toks) if t in stop)]
            out[i] = {"text": tok.decode(toks, skip_special_tokens=False), "tokens": len(toks), "finished": finished}
        if progress is not None:
            progress.update(len(idx))
    if was_training:
        model.train()
    return out


def _generate_engine(model, tok, prompts, *, max_new_tokens, temperature, top_p, seed, batch_size, progress):
    """The same completions through the rollout engine (:class:`lnkit.rl.rollout.TorchEngine`: a slot KV
    cache refilled as rows finish, several times the tokens per second of the ``hf`` path on a tiny model);
    greedy output is token for token the same, sampled output is another draw of the same distribution."""
    from lnkit.rl.rollout import TorchEngine

    engine = TorchEngine(model, tok, max_batch=batch_size)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    for r in engine.sample(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           progress=progress):
        toks = r.text_ids()
        out.append({"text": tok.decode(toks, skip_special_tokens=False), "tokens": len(toks), "finished": r.finished})
    return out


@torch.no_grad()
def decode_throughput(model, batch_size: int, prompt_len: int, steps: int, repeats: int = 5) -> float:
    """Generated tokens per second of KV-cache decoding (median over repeats), after a prefill of random
    prompts: the speed every stage compares architectures by, measured the same way for all of them."""
    return statistics.median(decode_throughput_rounds(model, batch_size, prompt_len, steps, repeats))


def decode_throughput_rounds(model, batch_size: int, prompt_len: int, steps: int, repeats: int = 5) -> list[float]:
    """Tokens per second of each of ``repeats`` timed rounds of :func:`decode_throughput` (their spread is
    the measurement's noise)."""
    model.eval()
    dev = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch_size, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    kw = _cache_kwarg(model)
    times = []
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        cache = DynamicCache()
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for s in range(steps):
            pos = torch.full((batch_size, 1), prompt_len + s, device=dev)
            out = model(input_ids=nxt, position_ids=pos, use_cache=True, **{kw: cache})
            nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return [batch_size * steps / t for t in times[1:]]
