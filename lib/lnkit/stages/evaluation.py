"""Stage 09: one evaluation of every model the pipeline made, in the paper's settings (Tables 3 and 5).

Every checkpoint of the run (``models``: the parent, the Puzzle child stage 03 fused, the fused child, the
distilled one, SFT, GRPO and the aligned model; ``extra_models``: any other stage or model folder) on every
domain of the held-out test split (``domains``), reasoning on and off:

- **pass@1** as the paper reports it: with thinking on, averaged over ``k`` samples per item at temperature
  0.6 and top-p 0.95; with thinking off, greedy. Thinking-on greedy is reported beside it (``greedy``).
- **response length** in tokens, **toggle compliance** (the mode's format kept) and **off-mode leakage**
  (working-out outside a think block).
- **IFEval**'s four metrics on held-out instruction prompts (:mod:`lnkit.data.ifeval`), greedy.
- the **gold-judged chat win rate** against ``baseline``'s answers on held-out chat prompts (the Arena-Hard
  analog of stage 08: ties half), greedy.
- **decode throughput** measured on this machine (KV-cache decoding at ``batch_size`` after a
  ``prompt_len`` prefill, median of ``timing_repeats``) and the **roofline** throughput of the same
  architecture on ``gpu`` (:func:`lnkit.deploy.estimate`), each also as a ratio to the parent's.

The held-out IFEval and chat prompts are the ones stage 08 keeps out of training (the prompts after its
first ``if_train`` / ``chat_train``), so stage 08's figures and these agree for its models.

Output, in ``<run_dir>/09_evaluation/``: ``results.csv``, one tidy table (model x domain x mode x metric,
with the item count, the sample count and a 95% bootstrap interval over items), ``table.csv`` (the Table
3/5 view: one row per model, on and off accuracy and length) and ``answers/<model>.jsonl``, every answer
with its verdict. A model's answers are keyed by the digest of its weights and the evaluation's settings:
a rerun (another model added, a figure's settings changed) reuses the answers of every model and setting
that did not change, and samples nothing twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lnkit import deploy, stage
from lnkit.checkpoints import load_model, model_dir, stage_dir, stage_named
from lnkit.data import chatworld, ifeval
from lnkit.data.chat import render_prompt, split_response
from lnkit.data.splits import load_split, load_world
from lnkit.eval import bootstrap_interval, evaluate
from lnkit.generate import decode_throughput_rounds, generate
from lnkit.gpuhours import Work
from lnkit.io import atomic_path, atomic_write_json, atomic_write_text, folder_digest, read_json
from lnkit.params import ParamError, RunParams, param
from lnkit.progress import progress_bar

NAME = "09_evaluation"

PUZZLE_CHILD = "puzzle_child"  # the stage-02 child stage 03 fused (its source.json says which)
LABELS = {"00_parent": "parent", PUZZLE_CHILD: "Puzzle child", "03_ffn_fusion": "fused",
          "04_distillation": "distilled", "06_reasoning_sft": "SFT", "07_grpo": "GRPO", "08_alignment": "aligned"}
DOMAINS = ("math", "science", "code", "instruct", "chat")
FIELDS = ["model", "label", "domain", "mode", "metric", "value", "n", "samples", "low", "high"]


@dataclass
class Params(RunParams):
    """Stage 09 parameters (fields match ``notebooks/09_evaluation.ipynb``'s parameters cell)."""

    STAGE = NAME
    threads: int = param(2, "torch CPU threads", lo=0, hi=256)
    models: list[str] = param(list(LABELS), "the checkpoints, in order: stages (puzzle_child: the child stage 03 "
                              "fused) or model folders", min_items=1)
    extra_models: list[str] = param([], "more checkpoints to evaluate: a stage or a model folder each")
    domains: list[str] = param(list(DOMAINS), "test domains to evaluate", min_items=1)
    k: int = param(4, "samples per item with thinking on (pass@1 averaged over them)", lo=1, hi=64)
    max_new_tokens: int = param(128, "generation limit per answer", lo=1)
    baseline: str = param("06_reasoning_sft", "the chat win rate's opponent (a stage or a model folder); "
                          "empty: no win rate")
    if_test: int = param(120, "held-out IFEval prompts", lo=0)
    if_train: int = param(300, "IFEval prompts stage 08 trains on (kept out of the test prompts)", lo=0)
    chat_test: int = param(100, "held-out chat prompts", lo=0)
    chat_train: int = param(500, "chat prompts stage 08 trains on (kept out of the test prompts)", lo=0)
    chat_max_new_tokens: int = param(96, "generation limit of IFEval and chat answers (stage 08's)", lo=1)
    gpu: str = param("H100", "the GPU the roofline throughput is priced on", choices=list(deploy.GPUS))
    batch_size: int = param(16, "decode batch of the throughput measurement", lo=1)
    prompt_len: int = param(64, "prompt tokens before decoding (throughput)", lo=1)
    decode_len: int = param(32, "decoded tokens per round (throughput)", lo=1)
    timing_repeats: int = param(7, "timed rounds per architecture, round-robin (the median is reported)", lo=1)
    batch: int = param(128, "rollout engine slots (generation batch)", lo=1)

    def check(self):
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ParamError(f"stage {self.STAGE}: parameter domains: unknown domain(s) {bad}; known: {list(DOMAINS)}")
        specs = self.models + self.extra_models
        if any(not s.strip() for s in specs):
            raise ParamError(f"stage {self.STAGE}: parameter models/extra_models holds an empty name")
        if len(set(specs)) != len(specs):
            raise ParamError(f"stage {self.STAGE}: a model is named twice in models + extra_models: {specs}")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): for each model, every test item with reasoning on
    (``k`` samples and a greedy answer) and off (greedy), the IFEval and chat items likewise."""
    parent = run.get("00_parent")
    items = (parent.n_test if parent else 200) * len(p.domains) + p.if_test + p.chat_test
    models = len(p.models) + len(p.extra_models)
    return Work(generate=models * items * (p.k + 2) * p.max_new_tokens, gen_len=p.max_new_tokens, model="child")


def needs(p: Params) -> list[str]:
    out = ["00_parent"]
    for spec in [*p.models, *p.extra_models, p.baseline]:
        st = "03_ffn_fusion" if spec == PUZZLE_CHILD else stage_named(spec) if spec else None
        if st:
            out.append(st)
    return list(dict.fromkeys(out))


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"models": 7, "best_on": ["SFT", 0.42], "best_off": ["parent", 0.55], "seconds": 150.2})
    '7 models; best pass@1 thinking on: SFT 42%, off: parent 55%'
    """
    return (f"{metrics['models']} models; best pass@1 thinking on: {metrics['best_on'][0]} {metrics['best_on'][1]:.0%}, "
            f"off: {metrics['best_off'][0]} {metrics['best_off'][1]:.0%}")


# ---------------------------------------------------------------------------------------------- models


def resolve(p: Params, spec: str) -> Path:
    """The model folder a name means; a clear error for an unknown one (nothing written yet)."""
    if spec == PUZZLE_CHILD:
        src = stage_dir(p.run_dir, "03_ffn_fusion") / "source.json"
        if not src.is_file():
            raise ParamError(f"stage {p.STAGE}: model {PUZZLE_CHILD!r} is the child stage 03 fused, but {src} does "
                             "not exist: run stage 03 first")
        return Path(p.run_dir) / read_json(src)["child_dir"]
    try:
        return model_dir(p.run_dir, spec)
    except FileNotFoundError as e:
        raise ParamError(f"stage {p.STAGE}: unknown checkpoint {spec!r}: {e}") from None


def label_of(spec: str) -> str:
    return LABELS.get(spec, spec)


def relative(folder: Path, run_dir: str) -> str:
    """``folder`` relative to the run folder where it lies inside it (a run folder can be moved), else absolute."""
    try:
        return str(Path(folder).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(Path(folder).resolve())


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- answers


class AnswerStore:
    """``answers/<slug>.jsonl``: one model's answers, each block under the key of the settings that made it
    (the model's digest and the generation's settings). A block is written whole or not at all."""

    def __init__(self, folder: Path, spec: str, digest: str):
        self.path = folder / "answers" / (spec.replace("/", "__") + ".jsonl")
        self.digest = digest
        self.blocks: dict[str, list] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("digest") == digest:
                    self.blocks[rec["key"]] = rec["rows"]

    def get(self, key: str, compute) -> list:
        if key not in self.blocks:
            self.blocks[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, "".join(json.dumps({"digest": self.digest, "key": k, "rows": v}) + "\n"
                                                 for k, v in self.blocks.items()))
        return self.blocks[key]


def greedy_answers(model, tok, prompts: list[str], mode: str, p: Params) -> list[str]:
    """The final answer (after any think block) of one greedy completion per prompt."""
    outs = generate(model, tok, [render_prompt(q, mode) for q in prompts], max_new_tokens=p.chat_max_new_tokens,
                    temperature=0.0, backend="engine", batch_size=p.batch)
    return [split_response(o["text"])[1].strip() for o in outs]


# ---------------------------------------------------------------------------------------------- rows


def row(spec, domain, mode, metric, values, samples=None) -> dict:
    """A tidy row: the mean of per-item ``values`` with its bootstrap interval."""
    values = list(values)
    low, high = bootstrap_interval(values)
    return {"model": spec, "label": label_of(spec), "domain": domain, "mode": mode, "metric": metric,
            "value": round(statistics.mean(values), 4) if values else float("nan"), "n": len(values),
            "samples": samples if samples is not None else len(values), "low": round(low, 4), "high": round(high, 4)}


def domain_rows(spec: str, sampled: list[dict], greedy: list[dict], domains) -> list[dict]:
    """pass@1 (on: the mean of the k samples; off: greedy), on-mode greedy, length, compliance, leakage."""
    out = []
    for mode in ("on", "off"):
        main = [r for r in (sampled if mode == "on" else greedy) if r["mode"] == mode]
        green = [r for r in greedy if r["mode"] == mode]
        for dom in [*domains, "all"]:
            rows = [r for r in main if dom == "all" or r["domain"] == dom]
            if not rows:
                continue
            per_item: dict[str, list[dict]] = {}
            for r in rows:
                per_item.setdefault(r["id"], []).append(r)

            def mean_of(key, items=per_item):
                return [statistics.mean(float(x[key]) for x in rs) for rs in items.values()]

            out.append(row(spec, dom, mode, "pass@1", mean_of("correct"), len(rows)))
            out.append(row(spec, dom, mode, "tokens", mean_of("tokens"), len(rows)))
            out.append(row(spec, dom, mode, "compliance", mean_of("compliant"), len(rows)))
            if mode == "off":
                out.append(row(spec, dom, mode, "leakage", mean_of("leak"), len(rows)))
            if mode == "on":
                g = [float(r["correct"]) for r in green if dom == "all" or r["domain"] == dom]
                out.append(row(spec, dom, mode, "greedy", g))
    return out


def evaluate_model(p: Params, spec: str, folder: Path, ctx: dict, out: Path) -> list[dict]:
    device = ctx["device"]
    model, tok = load_model(folder, device)
    store = AnswerStore(out, spec, folder_digest(folder))
    test = ctx["test"]
    ids = ",".join(it.id for it in test)
    gen = f"max_new={p.max_new_tokens}|seed={p.seed}|items={text_digest(ids)}"

    kw = dict(max_new_tokens=p.max_new_tokens, seed=p.seed, progress=p.progress, batch_size=p.batch)
    sampled = store.get(f"sampled|k={p.k}|{gen}", lambda: evaluate(model, tok, test, modes=("on",), k=p.k, **kw))
    greedy = store.get(f"greedy|{gen}", lambda: evaluate(model, tok, test, modes=("off", "on"), greedy=True, **kw))
    rows = domain_rows(spec, sampled, greedy, p.domains)

    for mode in ("on", "off"):
        if ctx["if_test"]:
            key = f"ifeval|{mode}|n={len(ctx['if_test'])}|{text_digest(''.join(x.key for x in ctx['if_test']))}" \
                  f"|max_new={p.chat_max_new_tokens}"
            answers = store.get(key, lambda m=mode: greedy_answers(model, tok, [x.prompt for x in ctx["if_test"]], m, p))
            follows = [ifeval.follow(a, x.instruction_id_list, x.kwargs) for a, x in zip(answers, ctx["if_test"])]
            for metric, per_prompt in ifeval_per_prompt(follows).items():
                rows.append(row(spec, "ifeval", mode, metric, per_prompt))
        if ctx["chat_test"] and ctx["baseline"] is not None:
            key = f"chat|{mode}|n={len(ctx['chat_test'])}|{text_digest(''.join(c.key for c in ctx['chat_test']))}" \
                  f"|max_new={p.chat_max_new_tokens}"
            mine = store.get(key, lambda m=mode: greedy_answers(model, tok, [c.prompt for c in ctx["chat_test"]], m, p))
            theirs = ctx["baseline"][mode]
            wins = [chatworld.win(chatworld.judge(ctx["world"], c, a)["score"], chatworld.judge(ctx["world"], c, b)["score"])
                    for c, a, b in zip(ctx["chat_test"], mine, theirs)]
            rows.append(row(spec, "chat_arena", mode, "win_rate", wins))

    return rows


def speed_rows(p: Params, folders: dict[str, Path], device: str) -> list[dict]:
    """Measured decode throughput and the roofline's, per model. Models of one architecture (the same
    config) share one measurement, and the rounds go round-robin over architectures, so a drift in the
    machine's speed during the measurement touches them all alike."""
    configs = {s: json.loads((f / "config.json").read_text()) for s, f in folders.items()}
    arch = {s: text_digest(json.dumps(c.get("block_configs") or c, sort_keys=True)) for s, c in configs.items()}
    first = {}
    for s, a in arch.items():
        first.setdefault(a, s)
    models = {a: load_model(folders[s], device)[0] for a, s in first.items()}
    rounds: dict[str, list[float]] = {a: [] for a in models}
    for _ in range(p.timing_repeats):
        for a, m in models.items():
            rounds[a] += decode_throughput_rounds(m, p.batch_size, p.prompt_len, p.decode_len, 1)
    out = []
    for s in folders:
        r = rounds[arch[s]]
        est = deploy.estimate(configs[s], p.gpu, batch_size=p.batch_size,
                              prompt_len=p.prompt_len, output_len=p.decode_len)
        out.append({"model": s, "label": label_of(s), "domain": "speed", "mode": "-", "metric": "decode_tok_s",
                    "value": round(statistics.median(r), 1), "n": len(r), "samples": len(r),
                    "low": round(min(r), 1), "high": round(max(r), 1)})
        out.append({"model": s, "label": label_of(s), "domain": "speed", "mode": "-",
                    "metric": f"roofline_tok_s_{p.gpu}", "value": round(est["throughput_tok_s"], 1), "n": 1,
                    "samples": 1, "low": "", "high": ""})
    return out


def ifeval_per_prompt(follows: list[dict]) -> dict[str, list[float]]:
    """IFEval's four metrics as per-prompt values (instruction-level: the share followed within the prompt,
    weighted by its instruction count, so the mean over prompts of ``share * count / mean count`` equals the
    pooled rate; the bootstrap resamples prompts)."""
    score = ifeval.score(follows)
    mean_count = statistics.mean(len(f["strict"]) for f in follows)
    out = {}
    for level in ("strict", "loose"):
        out[f"prompt_level_{level}_acc"] = [float(all(f[level])) for f in follows]
        out[f"inst_level_{level}_acc"] = [sum(f[level]) / mean_count for f in follows]
    for metric, vals in out.items():  # the per-prompt values average to IFEval's own (rounded) figures
        assert abs(statistics.mean(vals) - score[metric]) < 1e-4, metric
    return out


def with_ratios(rows: list[dict], parent: str) -> list[dict]:
    """Speed rows as a ratio to the parent's, measured in the same run."""
    base = {r["metric"]: r["value"] for r in rows if r["model"] == parent and r["domain"] == "speed"}
    extra = []
    for r in rows:
        if r["domain"] == "speed" and base.get(r["metric"]):
            extra.append({**r, "metric": r["metric"] + "_vs_parent", "value": round(r["value"] / base[r["metric"]], 3),
                          "low": "", "high": ""})
    return rows + extra


def table_view(rows: list[dict], specs: list[str]) -> list[dict]:
    """Tables 3 and 5 of the paper: per model, pass@1 on and off (all domains), length, compliance, IFEval,
    win rate, measured speed-up."""
    get = {(r["model"], r["domain"], r["mode"], r["metric"]): r["value"] for r in rows}
    out = []
    for s in specs:
        rec = {"model": s, "label": label_of(s)}
        for mode in ("on", "off"):
            rec[f"pass@1 {mode}"] = get.get((s, "all", mode, "pass@1"))
            rec[f"tokens {mode}"] = get.get((s, "all", mode, "tokens"))
            rec[f"compliance {mode}"] = get.get((s, "all", mode, "compliance"))
            rec[f"IFEval strict {mode}"] = get.get((s, "ifeval", mode, "prompt_level_strict_acc"))
            rec[f"win rate {mode}"] = get.get((s, "chat_arena", mode, "win_rate"))
        rec["leakage off"] = get.get((s, "all", "off", "leakage"))
        rec["decode speed-up"] = get.get((s, "speed", "-", "decode_tok_s_vs_parent"))
        out.append(rec)
    return out


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------- the stage


def run(p: Params) -> dict:
    stage.check_inputs(p, needs(p))
    specs = [*p.models, *p.extra_models]
    folders = {s: resolve(p, s) for s in specs}  # an unknown checkpoint stops here, nothing written
    baseline_dir = resolve(p, p.baseline) if p.baseline else None
    device = p.setup_torch()
    t0 = time.time()
    out = stage.start(p)
    world = load_world(p.run_dir)
    test = [it for it in load_split(p.run_dir, "test") if it.domain in p.domains]
    if_train = ifeval.make_prompts(world, p.if_train, seed=p.seed, ids=list(ifeval.TAUGHT)) if p.if_train else []
    if_test = ifeval.make_prompts(world, p.if_test, seed=p.seed + 1, ids=list(ifeval.TAUGHT),
                                  exclude={x.key for x in if_train}) if p.if_test else []
    _, chat_test = chatworld.split_prompts(world, p.chat_train, p.chat_test, seed=p.seed)
    ctx = {"device": device, "test": test, "world": world, "if_test": if_test, "chat_test": chat_test,
           "baseline": None}
    if baseline_dir is not None and chat_test:
        base, btok = load_model(baseline_dir, device)
        store = AnswerStore(out, "baseline__" + p.baseline, folder_digest(baseline_dir))
        ctx["baseline"] = {m: store.get(f"chat|{m}|n={len(chat_test)}|"
                                        f"{text_digest(''.join(c.key for c in chat_test))}|max_new={p.chat_max_new_tokens}",
                                        lambda m=m: greedy_answers(base, btok, [c.prompt for c in chat_test], m, p))
                           for m in ("on", "off")}
        del base
    rows = []
    with progress_bar(total=len(specs), desc="models", disable=not p.progress) as bar:
        for s in specs:
            bar.set_postfix_str(label_of(s))
            rows += evaluate_model(p, s, folders[s], ctx, out)
            bar.update(1)
    rows = with_ratios(rows + speed_rows(p, folders, device), specs[0])
    write_csv(out / "results.csv", rows, FIELDS)
    table = table_view(rows, specs)
    write_csv(out / "table.csv", table, list(table[0]))
    atomic_write_json(out / "models.json", {s: {"label": label_of(s), "folder": relative(folders[s], p.run_dir),
                                                "config": json.loads((folders[s] / "config.json").read_text())}
                                            for s in specs})
    best = {m: max(table, key=lambda r: r[f"pass@1 {m}"] or 0) for m in ("on", "off")}
    metrics = {"models": len(specs), "rows": len(rows), "seconds": round(time.time() - t0, 1),
               "best_on": [best["on"]["label"], best["on"]["pass@1 on"]],
               "best_off": [best["off"]["label"], best["off"]["pass@1 off"]], "table": table}
    return {"metrics": metrics, "rows": rows, "table": table}
