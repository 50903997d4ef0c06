"""Puzzle's block library (paper Section 2, Figure 3 step 1): every candidate sub-block, initialised from the
parent and trained by blockwise local distillation (BLD), with its loss before and after.

Steps, each a plain function:

1. :func:`calibrate` runs the parent on calibration token batches and records, per layer, the input of the
   attention sub-block (the residual stream before the layer), its output delta, the input of the FFN
   (the residual after attention) and its delta, plus the RoPE tables and mask each batch used.
2. :func:`init_candidate` builds each candidate as a :class:`~lnkit.model.modeling.NemotronNasDecoderLayer`
   holding only that sub-block, so its tensor names are the released ones, from the parent's weights rather
   than at random: FFN channels kept by measured contribution (:func:`ffn_channel_importance`,
   :func:`prune_ffn`), KV heads merged by mean pooling (:func:`merge_kv_heads`), linear blocks by least squares
   on calibration activations (:func:`fit_linear`); no-op has no weights.
3. :func:`distill` (BLD): the candidate gets the parent's own input to that sub-block and learns to reproduce
   the parent sub-block's output, loss = normalised MSE (MSE / mean square of the target, so 1.0 is "no-op").
   Attention and FFN are trained separately (decoupled BLD, the default), or, with ``coupled=True``, each
   (attention, FFN) pair as a whole layer on the layer's input and output (coupled BLD), starting from the
   two decoupled initialisations.
4. :func:`save_library` / :func:`load_library` store it one checksummed folder per candidate, and
   :func:`assemble` builds a child ``NemotronNasForCausalLM`` from one choice per layer and slot.

Deviations from the paper: losses are measured on the calibration batches the candidate was trained on (no
held-out split); BLD keeps the initial weights when training did not lower that loss (so ``loss_bld <=
loss_init`` by construction); coupled BLD trains every pair of the two lists (the paper trains a chosen
subset), so keep the lists short for coupled libraries.
Parent variants are not trained and store no weights: :func:`assemble` takes them from the parent.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lnkit.blocks import AttentionConfig, BlockConfig, FFNConfig
from lnkit.io import CheckpointError, atomic_dir, atomic_path, atomic_write_json, verify_checkpoint
from lnkit.model.config import NemotronNasConfig
from lnkit.model.convert import from_llama
from lnkit.model.modeling import NemotronNasDecoderLayer, NemotronNasForCausalLM
from lnkit.progress import progress_bar
from lnkit.puzzle.space import (
    COUPLED,
    PARENT_NAMES,
    SLOTS,
    Candidate,
    SearchSpace,
    candidates_for,
    check_layers,
    couple,
)

ROW_FIELDS = ("layer", "slot", "name", "params", "loss_init", "loss_bld")
WEIGHTS, BLOCK_JSON = "weights.safetensors", "block.json"


# ------------------------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Per-layer inputs and output deltas of the parent's sub-blocks, one fp32 CPU tensor per batch.

    ``inputs[(layer, slot)][b]`` is what that sub-block received on batch ``b`` (before its norm) and
    ``targets[(layer, slot)][b]`` what it added to the residual; ``rope[b]`` / ``masks[b]`` are the
    position embeddings and attention mask of batch ``b`` (the same for every layer).
    """

    inputs: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    rope: list = field(default_factory=list)
    masks: list = field(default_factory=list)


def as_nas(parent) -> NemotronNasForCausalLM:
    """The parent as a ``NemotronNasForCausalLM`` (a Llama is converted; same logits)."""
    return parent if isinstance(parent, NemotronNasForCausalLM) else from_llama(parent)


def _cpu(t):
    return None if t is None else t.detach().to("cpu", torch.float32)


@torch.no_grad()
def residual_stream(nas: NemotronNasForCausalLM, batches, layers, **forward_kwargs):
    """Run ``nas`` on each batch and yield what its sub-blocks saw: ``(streams, rope, mask, output)``.

    ``streams[i] = (x, mid, y)`` for each layer ``i`` in ``layers``: the residual stream entering the layer,
    after its attention (entering the FFN) and leaving it. ``rope``/``mask`` are what every layer received;
    ``output`` is the model's own output. Shared by :func:`calibrate` and the scorer's parent pass.
    """
    seen: dict = {}

    def before_layer(i):
        def hook(module, args, kwargs):
            seen[i] = {"x": args[0] if args else kwargs["hidden_states"]}
            if "rope" not in seen:
                seen["rope"], seen["mask"] = kwargs["position_embeddings"], kwargs.get("attention_mask")
        return hook

    def before_ffn(i):
        def hook(module, args):
            seen[i]["mid"] = args[0]  # post_attention_layernorm's input: the residual after attention
        return hook

    def after_layer(i):
        def hook(module, args, kwargs, out):
            seen[i]["y"] = out
        return hook

    handles = []
    for i in layers:
        layer = nas.model.layers[i]
        handles.append(layer.register_forward_pre_hook(before_layer(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after_layer(i), with_kwargs=True))
        if hasattr(layer, "post_attention_layernorm"):
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(before_ffn(i)))
    try:
        device = next(nas.parameters()).device
        for ids in batches:
            seen.clear()
            output = nas(input_ids=ids.to(device), use_cache=False, **forward_kwargs)
            # an FFN no-op in the parent has no norm to hook: its input is the layer's output
            streams = {i: (seen[i]["x"], seen[i].get("mid", seen[i]["y"]), seen[i]["y"]) for i in layers}
            yield streams, seen["rope"], seen["mask"], output
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(parent, batches, layers=None) -> Calibration:
    """Run the parent on ``batches`` (LongTensors ``[B, T]``, no padding) and record the chosen layers."""
    nas = as_nas(parent).eval()
    layers = check_layers(layers, nas.config.num_hidden_layers)
    cal = Calibration({(i, s): [] for i in layers for s in SLOTS}, {(i, s): [] for i in layers for s in SLOTS})
    for streams, (cos, sin), mask, _ in residual_stream(nas, batches, layers):
        cal.rope.append((_cpu(cos), _cpu(sin)))
        cal.masks.append(_cpu(mask) if torch.is_tensor(mask) else mask)
        for i, (x, mid, y) in streams.items():
            for slot, (a, b) in {"attention": (x, mid), "ffn": (mid, y)}.items():
                cal.inputs[(i, slot)].append(_cpu(a))
                cal.targets[(i, slot)].append(_cpu(b - a))
    return cal


# ---------------------------------------------------------------------------------------- initialisation


def sub_block_delta(module: NemotronNasDecoderLayer, x, rope=None, mask=None):
    """What a one-slot candidate layer adds to the residual stream ``x`` (zeros for a no-op); for a layer
    with both sub-blocks (coupled), what the whole layer adds."""
    if getattr(module, "attention_kind", "no_op") != "no_op" and module.ffn_kind != "no_op":
        return module(x, attention_mask=mask, position_embeddings=rope) - x
    if getattr(module, "attention_kind", "no_op") != "no_op":
        h = module.input_layernorm(x)
        if module.attention_kind == "linear":
            return module.self_attn(h)
        return module.self_attn(h, position_embeddings=rope, attention_mask=mask)[0]
    if module.ffn_kind != "no_op":
        return module.mlp(module.post_attention_layernorm(x))
    return torch.zeros_like(x)


@torch.no_grad()
def ffn_channel_importance(parent_layer: NemotronNasDecoderLayer, inputs) -> torch.Tensor:
    """Per FFN channel: mean over calibration tokens of ``|silu(gate) * up|``, times the norm of its
    ``down_proj`` column, i.e. how much that channel moves the output on real data."""
    mlp, total, n = parent_layer.mlp, 0.0, 0
    for x in inputs:
        h = parent_layer.post_attention_layernorm(x)
        act = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
        total = total + act.abs().reshape(-1, act.shape[-1]).sum(0)
        n += act.shape[0] * act.shape[1]
    return total / n * mlp.down_proj.weight.norm(dim=0)


@torch.no_grad()
def prune_ffn(mlp, importance: torch.Tensor, width: int) -> dict:
    """The ``width`` most important channels of a ``LlamaMLP`` (gate/up rows, down columns), in their
    original order, so keeping every channel returns the parent's tensors unchanged."""
    keep = torch.topk(importance, width).indices.sort().values
    out = {"gate_proj.weight": mlp.gate_proj.weight[keep], "up_proj.weight": mlp.up_proj.weight[keep],
           "down_proj.weight": mlp.down_proj.weight[:, keep]}
    for name in ("gate_proj", "up_proj"):
        if getattr(mlp, name).bias is not None:
            out[f"{name}.bias"] = getattr(mlp, name).bias[keep]
    if mlp.down_proj.bias is not None:
        out["down_proj.bias"] = mlp.down_proj.bias
    return {k: v.clone() for k, v in out.items()}


@torch.no_grad()
def merge_kv_heads(attn, factor: int) -> dict:
    """``k_proj``/``v_proj`` of a ``LlamaAttention`` with each run of ``factor`` KV heads mean-pooled into one.

    Query heads keep their weights: in grouped-query attention query head ``h`` reads KV head
    ``h // n_heads_in_group``, so merging consecutive KV heads serves exactly the query heads of the new group.
    """
    out = {}
    d = attn.head_dim
    for name in ("k_proj", "v_proj"):
        lin = getattr(attn, name)
        w = lin.weight.reshape(-1, factor, d, lin.weight.shape[-1]).mean(1)
        out[f"{name}.weight"] = w.reshape(-1, lin.weight.shape[-1]).clone()
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias.reshape(-1, factor, d).mean(1).reshape(-1).clone()
    return out


@torch.no_grad()
def fit_linear(norm, inputs, targets, ridge: float = 1e-6) -> torch.Tensor:
    """Least-squares ``W`` (hidden x hidden) with ``norm(x) @ W.T ~ delta`` over the calibration tokens.

    A tiny ridge (relative to the mean feature energy) keeps the solve defined when tokens are few."""
    xs = torch.cat([norm(x).reshape(-1, x.shape[-1]) for x in inputs]).double()
    ys = torch.cat([y.reshape(-1, y.shape[-1]) for y in targets]).double()
    gram = xs.T @ xs
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, xs.T @ ys).T.float()


@torch.no_grad()
def init_candidate(cand: Candidate, parent: NemotronNasForCausalLM, cal: Calibration) -> NemotronNasDecoderLayer:
    """The candidate as a one-slot decoder layer, its weights derived from the parent's layer; a coupled
    candidate as a whole layer holding its two parts' initialisations."""
    if cand.slot == COUPLED:
        module = NemotronNasDecoderLayer(parent.config, cand.block(), cand.layer, 0)
        p = next(parent.parameters())
        module.to(device=p.device, dtype=p.dtype)
        sd = {}
        for part in cand.parts:
            sd.update(init_candidate(part, parent, cal).state_dict())
        module.load_state_dict(sd, strict=True)
        return module.eval()
    src = parent.model.layers[cand.layer]
    module = NemotronNasDecoderLayer(parent.config, cand.block(), cand.layer, 0)
    p = next(parent.parameters())
    module.to(device=p.device, dtype=p.dtype)
    xs, ys = cal.inputs[(cand.layer, cand.slot)], cal.targets[(cand.layer, cand.slot)]
    sd = {}
    kind = cand.config.kind
    if cand.slot == "attention" and kind != "no_op":
        sd["input_layernorm.weight"] = src.input_layernorm.weight
        if kind == "attention":
            sd.update({f"self_attn.{k}": v for k, v in src.self_attn.state_dict().items()})
            sd.update({f"self_attn.{k}": v for k, v in merge_kv_heads(src.self_attn, cand.kv_factor).items()})
        else:
            sd["self_attn.linear_attn.weight"] = fit_linear(src.input_layernorm, xs, ys)
    elif cand.slot == "ffn" and kind != "no_op":
        sd["post_attention_layernorm.weight"] = src.post_attention_layernorm.weight
        if kind == "ffn":
            width = cand.config.width(parent.config.hidden_size)
            imp = ffn_channel_importance(src, xs)
            sd.update({f"mlp.{k}": v for k, v in prune_ffn(src.mlp, imp, width).items()})
        else:
            sd["mlp.linear_mlp.weight"] = fit_linear(src.post_attention_layernorm, xs, ys)
    module.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return module.eval()


# ------------------------------------------------------------------------------------------------- BLD


def _batch(cal: Calibration, key, b, device):
    rope = tuple(t.to(device) for t in cal.rope[b])
    mask = cal.masks[b].to(device) if torch.is_tensor(cal.masks[b]) else cal.masks[b]
    return cal.inputs[key][b].to(device), cal.targets[key][b].to(device), rope, mask


@torch.no_grad()
def nmse(module, cal: Calibration, key) -> float:
    """Normalised MSE over all calibration batches: sum of squared errors / sum of squared targets."""
    device = next(iter(module.parameters()), torch.empty(0)).device
    err = ref = 0.0
    for b in range(len(cal.targets[key])):
        x, y, rope, mask = _batch(cal, key, b, device)
        err += (sub_block_delta(module, x, rope, mask) - y).double().pow(2).sum().item()
        ref += y.double().pow(2).sum().item()
    return err / max(ref, 1e-30)


def distill(module, cal: Calibration, key, steps: int = 100, lr: float = 1e-3, seed: int = 0) -> tuple[float, float]:
    """Blockwise local distillation of one candidate (in place); returns ``(loss_init, loss_bld)``.

    Adam on the normalised MSE, one calibration batch a step in a seeded order. If training did not lower the
    loss the initial weights are put back, so BLD never makes a candidate worse than its initialisation.
    """
    loss_init = nmse(module, cal, key)
    params = list(module.parameters())
    if not params or steps <= 0:
        return loss_init, loss_init
    start = copy.deepcopy(module.state_dict())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    n, device = len(cal.targets[key]), params[0].device
    order = []
    module.train()
    for _ in range(steps):
        if not order:
            order = torch.randperm(n, generator=gen).tolist()
        x, y, rope, mask = _batch(cal, key, order.pop(), device)
        loss = (sub_block_delta(module, x, rope, mask) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    module.eval()
    loss_bld = nmse(module, cal, key)
    if loss_bld > loss_init:
        module.load_state_dict(start)
        loss_bld = loss_init
    return loss_init, loss_bld


# --------------------------------------------------------------------------------------------- library


@dataclass
class Entry:
    """A built candidate: its spec, its tensors under the released names (``None``: parent or no-op
    weights that are not stored) and its losses."""

    candidate: Candidate
    weights: dict | None
    params: int
    loss_init: float
    loss_bld: float

    def row(self) -> dict:
        c = self.candidate
        return {"layer": c.layer, "slot": c.slot, "name": c.name, "params": self.params,
                "loss_init": self.loss_init, "loss_bld": self.loss_bld}


@dataclass
class Library:
    """All built candidates, keyed by ``(layer, slot, name)``; ``rows`` is the loss table."""

    entries: dict

    @property
    def rows(self) -> list[dict]:
        return [e.row() for e in self.entries.values()]

    def names(self, layer: int, slot: str) -> list[str]:
        return [n for (i, s, n) in self.entries if i == layer and s == slot]


def build_library(parent, batches, space: SearchSpace | None = None, *, layers=None, steps: int = 100,
                  lr: float = 1e-3, seed: int = 0, coupled: bool = False, progress: bool = True) -> Library:
    """Calibrate, initialise and distill every candidate of ``layers`` (``None``: all); deterministic in ``seed``.

    ``layers`` lets a cluster split the library across jobs, each saving into the same folder. ``coupled``
    builds one whole-layer candidate per (attention, FFN) pair instead (coupled BLD). The sub-blocks of tiny
    models are small matrices: on a busy small CPU ``torch.set_num_threads(1)`` is far faster.
    """
    nas = as_nas(parent).eval()
    cands = candidates_for(nas.config, space or SearchSpace(), layers)
    cal = calibrate(nas, batches, layers)
    if coupled:
        cands = couple(cands)
        for i in check_layers(layers, nas.config.num_hidden_layers):  # the whole layer: input x, delta y - x
            cal.inputs[(i, COUPLED)] = cal.inputs[(i, "attention")]
            cal.targets[(i, COUPLED)] = [a + f for a, f in zip(cal.targets[(i, "attention")], cal.targets[(i, "ffn")])]
    entries = {}
    for k, cand in enumerate(progress_bar(cands, desc="block library", disable=not progress)):
        torch.manual_seed(seed + k)
        module = init_candidate(cand, nas, cal)
        key = (cand.layer, cand.slot)
        if cand.is_parent:
            loss_init = loss_bld = nmse(module, cal, key)
        else:
            loss_init, loss_bld = distill(module, cal, key, steps=steps, lr=lr, seed=seed + k)
        prefix = f"model.layers.{cand.layer}."
        weights = None if cand.is_parent or not list(module.parameters()) else {
            prefix + n: t.detach().to("cpu").contiguous() for n, t in module.state_dict().items()}
        params = sum(p.numel() for p in module.parameters())
        entries[(cand.layer, cand.slot, cand.name)] = Entry(cand, weights, params, loss_init, loss_bld)
    return Library(entries)


def write_rows_csv(rows: list[dict], path) -> None:
    """The loss table as CSV (atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_FIELDS)
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _folder_name(c: Candidate) -> str:
    return f"layer{c.layer:03d}_{c.slot}_{c.name}"


def save_library(library: Library, folder) -> Path:
    """One checksummed folder per candidate (``block.json`` + ``weights.safetensors``), a ``layerNNN.json``
    index per built layer, and ``losses.csv`` over every layer indexed in ``folder`` (jobs may share it)."""
    folder = Path(folder)
    by_layer = {}
    for e in library.entries.values():
        c = e.candidate
        with atomic_dir(folder / _folder_name(c)) as tmp:
            if e.weights:
                save_file(e.weights, str(tmp / WEIGHTS))
            meta = {**e.row(), "config": c.config.to_dict(), "is_parent": c.is_parent,
                    "kv_factor": c.kv_factor, "fraction": c.fraction}
            (tmp / BLOCK_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
        by_layer.setdefault(c.layer, []).append(_folder_name(c))
    for layer, names in by_layer.items():
        atomic_write_json(folder / f"layer{layer:03d}.json", {"layer": layer, "candidates": names})
    write_rows_csv(load_library(folder).rows, folder / "losses.csv")
    return folder


def _attention_config(cfg: dict) -> AttentionConfig:
    return AttentionConfig(cfg["no_op"], cfg["replace_with_linear"], cfg["n_heads_in_group"])


def _ffn_config(cfg: dict) -> FFNConfig:
    return FFNConfig(cfg["no_op"], cfg["replace_with_linear"], cfg["ffn_mult"], cfg.get("intermediate_size"))


def load_library(folder) -> Library:
    """Every candidate indexed in ``folder``, each checked against its manifest first.

    Raises :class:`lnkit.io.CheckpointError` naming the candidate when its folder is missing or corrupt.
    """
    folder = Path(folder)
    indices = sorted(folder.glob("layer[0-9][0-9][0-9].json"))
    if not indices:
        raise CheckpointError(f"block library {folder} has no layerNNN.json index: nothing was saved there")
    entries = {}
    for index in indices:
        for name in json.loads(index.read_text())["candidates"]:
            path = folder / name
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                raise CheckpointError(f"block library candidate {name} is missing or corrupt: {e}") from None
            meta = json.loads((path / BLOCK_JSON).read_text())
            cfg = meta["config"]
            if meta["slot"] == COUPLED:
                config = BlockConfig(_attention_config(cfg["attention"]), _ffn_config(cfg["ffn"]))
            else:
                config = (_attention_config if meta["slot"] == "attention" else _ffn_config)(cfg)
            cand = Candidate(meta["layer"], meta["slot"], meta["name"], config, meta["is_parent"],
                             meta["kv_factor"], meta["fraction"])
            if cand.slot == COUPLED:
                a, f = cand.name.split("+")
                cand = replace(cand, parts=(
                    Candidate(cand.layer, "attention", a, config.attention, a == PARENT_NAMES["attention"], cand.kv_factor),
                    Candidate(cand.layer, "ffn", f, config.ffn, f == PARENT_NAMES["ffn"], fraction=cand.fraction)))
            weights = load_file(str(path / WEIGHTS)) if (path / WEIGHTS).is_file() else None
            entries[(cand.layer, cand.slot, cand.name)] = Entry(cand, weights, meta["params"], meta["loss_init"],
                                                                meta["loss_bld"])
    return Library(entries)


# -------------------------------------------------------------------------------------------- assemble


def _slot_keys(state: dict, layer: int, slot: str) -> dict:
    prefix = f"model.layers.{layer}."
    parts = ("input_layernorm.", "self_attn.") if slot == "attention" else ("post_attention_layernorm.", "mlp.")
    return {k: v for k, v in state.items() if k.startswith(tuple(prefix + p for p in parts))}


@torch.no_grad()
def assemble(parent, choice: dict, library: Library) -> NemotronNasForCausalLM:
    """The child model: for each ``(layer, slot)`` the candidate named in ``choice`` (missing keys and the
    parent variants ``attn_parent`` / ``ffn_100`` / ``attn_parent+ffn_100`` take the parent's weights; a
    coupled library is chosen from by ``(layer, "block")`` keys); embeddings, final norm and
    LM head are the parent's. Same device, dtype and generation config as the parent; eval mode."""
    nas = as_nas(parent)
    cfg, parent_state = nas.config, nas.state_dict()
    blocks, state = [], {k: v for k, v in parent_state.items() if not k.startswith("model.layers.")}
    coupled = any(slot == COUPLED for _, slot, _ in library.entries)
    for i in range(cfg.num_hidden_layers):
        block = {}
        for slot in (COUPLED,) if coupled else SLOTS:
            name = choice.get((i, slot), PARENT_NAMES[slot])
            entry = library.entries.get((i, slot, name))
            if entry is None and name != PARENT_NAMES[slot]:
                raise KeyError(f"choice ({i}, {slot!r}) = {name!r} is not in the block library; "
                               f"allowed: {[PARENT_NAMES[slot]] + [n for n in library.names(i, slot) if n != PARENT_NAMES[slot]]}")
            parent_block = cfg.block_configs[i]
            if entry is None or entry.candidate.is_parent:
                for part in SLOTS if slot == COUPLED else (slot,):
                    block[part] = getattr(parent_block, part).to_dict()
                    state.update(_slot_keys(parent_state, i, part))
            else:
                c = entry.candidate
                block.update(c.config.to_dict() if slot == COUPLED else {slot: c.config.to_dict()})
                state.update(entry.weights or {})
        blocks.append(block)
    raw = cfg.to_dict()
    raw["block_configs"] = blocks
    child_cfg = NemotronNasConfig.from_dict(raw)
    child_cfg._attn_implementation = cfg._attn_implementation
    p = next(nas.parameters())
    child = NemotronNasForCausalLM(child_cfg).to(device=p.device, dtype=p.dtype)
    child.load_state_dict(state, strict=True)
    if child_cfg.tie_word_embeddings:
        child.tie_weights()
    child.generation_config = copy.deepcopy(nas.generation_config)
    return child.eval()
