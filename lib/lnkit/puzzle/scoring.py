"""Puzzle's replace-1-block scores (paper Section 2, Figure 3 step 2): how much each library candidate, swapped
into an otherwise unchanged parent, moves the parent's outputs on held-out tokens.

The MIP (:mod:`lnkit.puzzle.mip`) treats these scores as additive over layers, so each candidate is scored
alone: the child is the parent everywhere except that one (layer, slot). Three metrics, all "lower is better":

- ``kl``: mean over tokens of KL(parent's next-token distribution || the child's), the default score;
- ``lm_loss``: the child's next-token cross-entropy on the batches, with ``lm_loss_delta`` = child - parent;
- ``cosine``: 1 - mean cosine similarity of the final hidden states (after the final norm, what the LM head
  reads) of child and parent.

By default every position counts. ``positions`` restricts all three to chosen positions, e.g. those that
predict an assistant token: a parent trained with the loss on answers only never learned to predict its
prompts, so an LM loss over prompt tokens rewards blocks that *damage* the model (removing a block can lower
it), and KL there measures changes nobody will see.

Speed: the parent runs once per batch (:func:`parent_pass`), keeping its logits and, per layer, the residual
stream entering the layer and entering its FFN. A candidate at layer ``L`` cannot change anything before it,
so :func:`replaced_hidden` starts from that cached residual and runs only the candidate sub-block and the
parent's layers after it: on average half the layers per candidate instead of all of them, and no model is
assembled. The price is memory, for all batches at once: ``2 x layers x tokens x hidden`` floats of cached
residuals plus ``tokens x vocab`` of parent log-probabilities; pass fewer or smaller batches if that is too much.
:func:`score_child` is the slow reference (assemble, run the whole child); the tests check both agree.

Batches are LongTensors ``[B, T]`` without padding (every position is a real token), like the library's.
Deviation from the paper: scores are on whatever batches you pass; the paper used a held-out distillation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lnkit.model.modeling import NemotronNasDecoderLayer
from lnkit.progress import progress_bar
from lnkit.puzzle.library import Library, as_nas, residual_stream, sub_block_delta
from lnkit.puzzle.space import COUPLED

METRICS = ("kl", "lm_loss", "cosine")


def _check_metrics(metrics) -> tuple:
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics: {bad or 'none given'} not allowed; choose from {METRICS}")
    return metrics


# ------------------------------------------------------------------------------------------- parent pass


@dataclass
class ParentPass:
    """What one run of the parent leaves behind, per batch ``b``.

    ``residuals[b][i]`` is ``(x, mid)``: the residual stream entering layer ``i`` and entering its FFN (after
    attention). ``rope[b]`` / ``masks[b]`` are what every layer received; ``logprobs[b]`` and ``final[b]``
    the parent's next-token log-probabilities and final (normed) hidden states.
    """

    residuals: list = field(default_factory=list)
    rope: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    final: list = field(default_factory=list)


@torch.no_grad()
def parent_pass(parent, batches) -> ParentPass:
    """Run the parent once on every batch, caching what :func:`replaced_hidden` restarts from."""
    nas = as_nas(parent).eval()
    layers = range(nas.config.num_hidden_layers)
    out = ParentPass()
    for streams, rope, mask, res in residual_stream(nas, batches, layers, output_hidden_states=True):
        out.residuals.append([(streams[i][0], streams[i][1]) for i in layers])
        out.rope.append(rope)
        out.masks.append(mask)
        out.logprobs.append(F.log_softmax(res.logits.float(), -1))
        out.final.append(res.hidden_states[-1])
    return out


# -------------------------------------------------------------------------------------- one-block children


@torch.no_grad()
def candidate_module(entry, parent) -> NemotronNasDecoderLayer:
    """A library entry as a one-slot decoder layer on the parent's device and dtype.

    Parent variants store no weights in the library: they take the parent layer's own tensors for that slot.
    """
    nas = as_nas(parent)
    cand = entry.candidate
    module = NemotronNasDecoderLayer(nas.config, cand.block(), cand.layer, 0)
    p = next(nas.parameters())
    module.to(device=p.device, dtype=p.dtype)
    if cand.is_parent:
        parts = {"attention": ("input_layernorm.", "self_attn."), "ffn": ("post_attention_layernorm.", "mlp.")}
        keep = parts["attention"] + parts["ffn"] if cand.slot == COUPLED else parts[cand.slot]
        state = {k: v for k, v in nas.model.layers[cand.layer].state_dict().items() if k.startswith(keep)}
    else:
        prefix = f"model.layers.{cand.layer}."
        state = {k[len(prefix):]: v for k, v in (entry.weights or {}).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def _parent_ffn_delta(layer: NemotronNasDecoderLayer, x):
    return layer.mlp(layer.post_attention_layernorm(x)) if layer.ffn_kind != "no_op" else torch.zeros_like(x)


@torch.no_grad()
def replaced_hidden(parent, passed: ParentPass, b: int, module, layer: int, slot: str):
    """Final (normed) hidden states of batch ``b`` for the parent with ``(layer, slot)`` replaced by ``module``.

    Starts from the parent's cached residual at that slot, so the layers before ``layer`` are not rerun.
    """
    nas = as_nas(parent)
    rope, mask = passed.rope[b], passed.masks[b]
    x, mid = passed.residuals[b][layer]
    if slot == COUPLED:
        x = x + sub_block_delta(module, x, rope, mask)
    elif slot == "attention":
        x = x + sub_block_delta(module, x, rope, mask)
        x = x + _parent_ffn_delta(nas.model.layers[layer], x)
    else:
        x = mid + sub_block_delta(module, mid, rope, mask)
    for later in nas.model.layers[layer + 1:]:
        x = later(x, attention_mask=mask, position_embeddings=rope)
    return nas.model.norm(x)


# ------------------------------------------------------------------------------------------------ metrics


class _Totals:
    """Token-weighted running sums of the metrics over batches (float64, so many batches add exactly)."""

    def __init__(self):
        self.kl = self.ce = self.cos = 0.0
        self.tokens = self.targets = 0

    def add(self, ids, parent_logprobs, parent_final, logits, final, positions=None):
        """Add one batch; ``positions`` (bool ``[B, T]``) restricts every metric to those positions (the
        LM loss there predicts the next token, so a selected position must not be a row's last)."""
        logp = F.log_softmax(logits.float(), -1)
        p = parent_logprobs.exp()
        kl = (p * (parent_logprobs - logp)).sum(-1)
        cos = F.cosine_similarity(final.float(), parent_final.float(), dim=-1)
        ce = F.cross_entropy(logp[:, :-1].transpose(1, 2), ids[:, 1:].to(logp.device), reduction="none")
        if positions is None:
            self.kl += kl.double().sum().item()
            self.cos += cos.double().sum().item()
            self.ce += ce.double().sum().item()
            self.tokens += ids.numel()
            self.targets += ids[:, 1:].numel()
            return
        pos = positions.to(kl.device)
        if pos.shape != ids.shape or pos[:, -1].any():
            raise ValueError("positions must be a bool mask shaped like the batch, False at each row's last position")
        self.kl += kl[pos].double().sum().item()
        self.cos += cos[pos].double().sum().item()
        self.ce += ce[pos[:, :-1]].double().sum().item()
        self.tokens += int(pos.sum())
        self.targets += int(pos.sum())

    def row(self, metrics, parent_lm_loss):
        out = {}
        if "kl" in metrics:
            out["kl"] = self.kl / self.tokens
        if "lm_loss" in metrics:
            out["lm_loss"] = self.ce / self.targets
            out["lm_loss_delta"] = out["lm_loss"] - parent_lm_loss
        if "cosine" in metrics:
            out["cosine"] = 1.0 - self.cos / self.tokens
        return out


def _parent_lm_loss(passed: ParentPass, batches, positions=None) -> float:
    tot = _Totals()
    for b, ids in enumerate(batches):
        tot.add(ids, passed.logprobs[b], passed.final[b], passed.logprobs[b], passed.final[b],
                None if positions is None else positions[b])
    return tot.ce / max(tot.targets, 1)


def _check_positions(positions, batches):
    if positions is None:
        return None
    positions = list(positions)
    if len(positions) != len(batches):
        raise ValueError(f"positions has {len(positions)} masks for {len(batches)} batches")
    if not any(bool(m.any()) for m in positions):
        raise ValueError("positions selects no token: nothing to score")
    return positions


@torch.no_grad()
def score_child(parent, child, batches, metrics=METRICS, positions=None) -> dict:
    """The slow reference: run the whole ``child`` (e.g. from :func:`~lnkit.puzzle.library.assemble`) and the
    parent on ``batches`` and score it with the same metrics as :func:`score_candidates`."""
    metrics = _check_metrics(metrics)
    batches = list(batches)
    positions = _check_positions(positions, batches)
    passed = parent_pass(parent, batches)
    child = child.eval()
    device = next(child.parameters()).device
    tot = _Totals()
    for b, ids in enumerate(batches):
        res = child(input_ids=ids.to(device), use_cache=False, output_hidden_states=True)
        tot.add(ids, passed.logprobs[b], passed.final[b], res.logits, res.hidden_states[-1],
                None if positions is None else positions[b])
    return tot.row(metrics, _parent_lm_loss(passed, batches, positions))


@torch.no_grad()
def score_candidates(parent, library: Library, batches, metrics=METRICS, progress: bool = True,
                     positions=None) -> list[dict]:
    """Replace-1-block scores of every candidate in ``library``, the parent everywhere else.

    Returns one row per candidate, in library order: ``{layer, slot, name}`` plus the chosen metrics
    (``lm_loss`` brings ``lm_loss_delta``). Parent variants score ~0 (rounding only). ``positions``: one bool
    mask per batch (e.g. :func:`lnkit.puzzle.calibration.token_batches` with ``positions=True``) restricting every metric to
    those positions; ``None`` scores every position.
    """
    metrics = _check_metrics(metrics)
    batches = list(batches)
    positions = _check_positions(positions, batches)
    nas = as_nas(parent).eval()
    passed = parent_pass(nas, batches)
    parent_loss = _parent_lm_loss(passed, batches, positions)
    rows = []
    for entry in progress_bar(list(library.entries.values()), desc="replace-1-block scores", disable=not progress):
        c = entry.candidate
        module = candidate_module(entry, nas)
        tot = _Totals()
        for b, ids in enumerate(batches):
            final = replaced_hidden(nas, passed, b, module, c.layer, c.slot)
            tot.add(ids, passed.logprobs[b], passed.final[b], nas.lm_head(final), final,
                    None if positions is None else positions[b])
        rows.append({"layer": c.layer, "slot": c.slot, "name": c.name, **tot.row(metrics, parent_loss)})
    return rows
