"""Block cost tables: what every distinct sub-block costs to run, measured once and then read, never re-timed.

The MIP's prices must not be a lottery. Timing each block afresh on a noisy CPU made the chosen child change
between reruns of the same inputs (objective 0.047 vs 0.160 in one rerun) and between machines. A table
fixes the prices: each distinct sub-block (slot + released-format config; identical blocks at different
layers share one entry) timed alone over ``rounds`` rounds of ``repeats`` timed calls each, the median of
the rounds' medians kept, with every round's figure beside it (the spread). The table names the machine it
came from and the setup it is valid for (model width, heads, vocabulary, decode batch, prompt and decode
lengths, dtype): a table is used only where its setup matches exactly.

Where tables come from:

- packaged: ``lnkit/puzzle/cost_tables/*.json``, measured once for the embedded runs (``tiny``, ``smoke``)
  with ``python -m lnkit.puzzle.cost_table RUN_DIR --out ...``; the default tiny run prices with these, so it
  picks the same architecture on every machine;
- measured here: stage 02 with ``cost_source="measured"`` (or no packaged table for the setup) times blocks
  once, stores the table in ``<run_dir>/cost_tables/`` and reuses it on every later run of that folder
  unless ``remeasure_costs`` is set.

Besides the blocks, a table holds ``rest_decode_s``: one decode step of what every model has outside its
layers (embedding lookup, final norm, LM head), so a child's priced speed-up over the parent is
``(parent blocks + rest) / (child blocks + rest)``, the deterministic figure stage 02 picks its 2x child by.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lnkit.io import ArtifactError, atomic_write_json, read_json
from lnkit.model.modeling import NemotronNasDecoderLayer, causal_mask, rope_config
from lnkit.progress import progress_bar
from lnkit.puzzle.space import parent_nas_config

FORMAT = 1
PACKAGED = Path(__file__).parent / "cost_tables"


def block_key(slot: str, config) -> str:
    """A sub-block's key: its slot and its released-format config, which fix what it computes.

    >>> from lnkit.blocks import FFNConfig
    >>> block_key("ffn", FFNConfig(intermediate_size=64, ffn_mult=1.5))
    'ffn {"ffn_mult": 1.5, "intermediate_size": 64, "no_op": false, "replace_with_linear": false}'
    """
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.compare}
    return f"{slot} {json.dumps(fields, sort_keys=True)}"


def setup_of(parent_config, batch_size: int, prompt_len: int, decode_len: int, dtype=torch.float32) -> dict:
    """What a table's times depend on besides the blocks themselves."""
    cfg = parent_nas_config(parent_config)
    return {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "head_size": cfg.head_size, "vocab_size": cfg.vocab_size, "batch_size": batch_size,
            "prompt_len": prompt_len, "decode_len": decode_len, "dtype": str(dtype).removeprefix("torch.")}


def setup_digest(setup: dict) -> str:
    """A short name for a setup, for the file a measured table is stored under."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]


def machine() -> dict:
    """Where a table was measured: enough to tell two machines apart when comparing tables."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "system": platform.platform(),
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure(candidates, parent_config, batch_size: int, prompt_len: int, decode_len: int, *, rounds: int = 5,
            repeats: int = 5, warmup: int = 2, device=None, dtype=torch.float32, progress: bool = False) -> dict:
    """A table for ``candidates`` (space candidates, coupled ones by their parts), timed on ``device``."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = timing_config(parent_config)
    parts = {}
    for c in candidates:
        for part in c.parts or (c,):
            parts.setdefault(block_key(part.slot, part.config), part)
    blocks = {}
    for key, part in progress_bar(sorted(parts.items()), desc="timing blocks", disable=not progress):
        times = [time_block(cfg, part, batch_size, prompt_len, decode_len, repeats, warmup, device, dtype)
                 for _ in range(rounds)]
        blocks[key] = _entry([t[0] for t in times], [t[1] for t in times])
    rest = [time_rest(cfg, batch_size, repeats, warmup, device, dtype) for _ in range(rounds)]
    return {"format": FORMAT, "setup": setup_of(parent_config, batch_size, prompt_len, decode_len, dtype),
            "machine": machine(), "rounds": rounds, "repeats": repeats, "warmup": warmup,
            "rest_decode_s": statistics.median(rest), "rest_decode_s_rounds": rest, "blocks": blocks}


def _median_seconds(step, repeats: int, warmup: int, device, reset=None) -> float:
    """Median wall time of ``step()`` (``reset()`` runs untimed after each call), synchronising a GPU."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for k in range(warmup + repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if k >= warmup:
            times.append(time.perf_counter() - t)
        if reset is not None:
            reset()
    return statistics.median(times)


def timing_config(parent_config, attn_implementation: str = "sdpa"):
    """The parent's ``NemotronNasConfig``, copied, with the attention kernel named (a bare config names none;
    a loaded model would say sdpa): what every timed block is built from."""
    cfg = copy.deepcopy(parent_nas_config(parent_config))
    cfg._attn_implementation = attn_implementation
    return cfg


@torch.inference_mode()
def time_block(cfg, cand, batch_size, prompt_len, decode_len, repeats, warmup, device, dtype) -> tuple:
    """(prefill seconds, decode-step seconds) of one candidate sub-block alone."""
    if cand.config.kind == "no_op":
        return 0.0, 0.0
    torch.manual_seed(0)  # the same weights and inputs every time: only the clock varies
    module = NemotronNasDecoderLayer(cfg, cand.block(), cand.layer, 0).to(device=device, dtype=dtype).eval()
    rotary = LlamaRotaryEmbedding(config=rope_config(cfg)).to(device)
    h = cfg.hidden_size
    x = torch.randn(batch_size, prompt_len, h, device=device, dtype=dtype)
    pos = torch.arange(prompt_len, device=device)[None]
    rope = rotary(x, pos)
    mask = causal_mask(cfg, x, None, None, pos)
    prefill = _median_seconds(lambda: module(x, attention_mask=mask, position_embeddings=rope),
                              repeats, warmup, device)
    one = torch.randn(batch_size, 1, h, device=device, dtype=dtype)
    if cand.config.kind != "attention":  # linear blocks and FFNs keep no state between tokens
        return prefill, _median_seconds(lambda: module(one), repeats, warmup, device)
    ctx = prompt_len + decode_len // 2
    cache = DynamicCache()
    past = torch.randn(batch_size, ctx, h, device=device, dtype=dtype)
    past_pos = torch.arange(ctx, device=device)[None]
    module(past, attention_mask=causal_mask(cfg, past, None, None, past_pos),
           position_embeddings=rotary(past, past_pos), cache=cache)
    rope_one = rotary(one, torch.tensor([[ctx]], device=device))
    decode = _median_seconds(lambda: module(one, position_embeddings=rope_one, cache=cache),
                             repeats, warmup, device, reset=lambda: cache.crop(-1))  # drop the new token: same context each step
    return prefill, decode


@torch.inference_mode()
def time_rest(cfg, batch_size, repeats, warmup, device, dtype) -> float:
    """Seconds of one decode step of what lies outside the layers: embedding lookup, final norm, LM head
    (random weights of the parent's shapes; time does not depend on the values)."""
    torch.manual_seed(0)
    h, v = cfg.hidden_size, cfg.vocab_size
    embed = torch.nn.Embedding(v, h).to(device=device, dtype=dtype)
    norm = torch.nn.RMSNorm(h, eps=cfg.rms_norm_eps).to(device=device, dtype=dtype)
    head = torch.nn.Linear(h, v, bias=False).to(device=device, dtype=dtype)
    ids = torch.randint(0, v, (batch_size, 1), device=device)
    return _median_seconds(lambda: head(norm(embed(ids))), repeats, warmup, device)


def _entry(prefill: list[float], decode: list[float]) -> dict:
    return {"prefill_s": statistics.median(prefill), "decode_s": statistics.median(decode),
            "prefill_s_rounds": prefill, "decode_s_rounds": decode}


def save(table: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, table)
    return path


def load(path: str | Path) -> dict:
    """A table from ``path``; an unreadable or malformed one is an :class:`~lnkit.io.ArtifactError` naming it."""
    table = read_json(path)
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a cost table of format {FORMAT} (got format "
                            f"{table.get('format') if isinstance(table, dict) else type(table).__name__!r})")
    for field in ("setup", "blocks", "rest_decode_s", "machine"):
        if field not in table:
            raise ArtifactError(f"{path}: cost table without {field!r}")
    for key, entry in table["blocks"].items():
        if not all(isinstance(entry.get(k), (int, float)) and entry[k] >= 0 for k in ("prefill_s", "decode_s")):
            raise ArtifactError(f"{path}: block {key!r} has no non-negative prefill_s/decode_s")
    return table


def packaged(setup: dict) -> Path | None:
    """The packaged table measured for exactly this setup, if there is one."""
    for path in sorted(PACKAGED.glob("*.json")):
        if load(path)["setup"] == setup:
            return path
    return None


def missing(table: dict, candidates) -> list[str]:
    """Keys of ``candidates``' sub-blocks the table has no entry for."""
    keys = {block_key(p.slot, p.config) for c in candidates for p in (c.parts or (c,))}
    return sorted(keys - set(table["blocks"]))


def describe(table: dict, path: str | Path | None = None) -> str:
    """One line saying where a table came from.

    >>> describe({"machine": {"cpu": "X", "cores": 2, "measured_at": "2026-12-01T00:00:00+00:00"},
    ...           "rounds": 5, "repeats": 5, "blocks": {"a": {}}})
    'cost table of 1 blocks measured on X (2 cores) at 2026-12-01T00:00:00+00:00, median of 5 rounds x 5 repeats'
    """
    m = table["machine"]
    where = f" ({path})" if path else ""
    return (f"cost table{where} of {len(table['blocks'])} blocks measured on {m['cpu']} ({m['cores']} cores) at "
            f"{m['measured_at']}, median of {table['rounds']} rounds x {table['repeats']} repeats")


def main(argv: list[str] | None = None) -> int:
    """``python -m lnkit.puzzle.cost_table RUN_DIR --out FILE``: time every sub-block of a run's block library
    (stage 01) at stage 02's decode setup, and write the table."""
    from lnkit.checkpoints import load_model, require
    from lnkit.puzzle.library import load_library

    ap = argparse.ArgumentParser(prog="python -m lnkit.puzzle.cost_table", description=main.__doc__)
    ap.add_argument("run_dir", help="a run folder with stages 00 and 01 complete")
    ap.add_argument("--out", required=True, help="where to write the table (JSON)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (stage 02 times with 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parent_config = load_model(require(args.run_dir, "00_parent") / "model")[0].config
    library = load_library(require(args.run_dir, "01_block_library") / "library")
    cands = [e.candidate for e in library.entries.values()]
    table = measure(cands, parent_config, args.batch_size, args.prompt_len, args.decode_len, rounds=args.rounds,
                    repeats=args.repeats, device="cpu", progress=sys.stderr.isatty())
    print(f"wrote {save(table, args.out)}: {describe(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
