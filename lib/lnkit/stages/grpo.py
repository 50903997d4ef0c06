"""Stage 07: GRPO for reasoning, with the pass-rate curriculum (paper Section 5, Figures 5 and 6).

Starting from the stage-06 SFT model (``init``; any stage or model folder), on verifiable training prompts
(``prompts``: how many per domain of the train split, math, science and code):

1. **Pass rates.** Each prompt is answered ``pass_k`` times with reasoning on by ``pass_rate_model`` (default:
   the starting model; the paper used LN-Super's for LN-Ultra) and scored by the accuracy reward; prompts at
   or above ``max_pass_rate`` are dropped (:mod:`lnkit.rl.curriculum`). Kept in ``pass_rates.json``.
2. **Batches.** Each rollout batch holds ``prompts_per_batch`` prompts, drawn by the curriculum (a Gaussian
   over pass rate whose mean moves from ``curriculum_start`` to ``curriculum_end``) or at random (``order``).
   A share ``off_fraction`` of them is asked with ``detailed thinking off``, so the toggle is trained too.
3. **Rollouts.** ``group_size`` completions per prompt at ``temperature``/``top_p`` from the torch rollout
   engine (:mod:`lnkit.rl.rollout`), with their log-probabilities; with ``fp8_rollouts`` from an FP8
   (emulated) copy of the policy, whose per-token log-probability gap to the trained policy is logged, and
   optionally corrected by truncated importance sampling (``tis_cap``).
4. **Rewards and loss.** The weighted sum of ``rewards`` (:mod:`lnkit.rl.rewards`: accuracy by the item's
   verifier, generated code only in the sandbox; format by the mode); group-normalised advantages and the
   clipped GRPO loss (:mod:`lnkit.rl.grpo`, TRL's definitions), ``num_iterations`` optimizer steps per
   rollout batch on the shared training loop (warmup, atomic checkpoints, exact resume, the spike guard).
   Groups whose completions all scored the same carry no advantage and are left out of the loss's batch.
5. **Evaluation.** Every ``eval_every`` steps, greedy held-out accuracy with reasoning on and off on
   ``curve_n`` test items per domain and level (Figure 5's curve); at the end, the start and the final model
   on the whole test split, reasoning on averaged over ``eval_k`` samples for math and science, with a
   bootstrap interval for the change on the target cells (math levels 4-5, science levels 1-3).

Resume: checkpoints land on rollout-batch boundaries (``ckpt_every`` is a multiple of ``num_iterations``);
a batch's prompts, modes and sampling seed are functions of ``(seed, batch index)`` and the rollouts of the
checkpointed weights, so a stage killed and rerun ends with the same weights and metrics as one that was not.

Writes ``<run_dir>/07_grpo/``: ``model/``, ``train_log.csv`` (per optimizer step: loss, rewards, KL, clip
fraction, lengths...), ``batches.jsonl`` (per rollout batch: prompts, pass rates, the curriculum's target,
rewards, the best-rewarded answers), ``eval_curve.csv``, ``eval_start.json``, ``eval_final_rows.jsonl``,
``eval_summary.json`` and ``metrics.json``. Notebook: ``notebooks/07_grpo.ipynb``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lnkit import stage
from lnkit.checkpoints import load_model, model_dir, save_model, stage_dir, stage_named
from lnkit.data.chat import render_prompt
from lnkit.data.splits import load_split
from lnkit.data.tasks import MAX_DIFFICULTY, Item
from lnkit.eval import evaluate, summarize
from lnkit.gpuhours import Work
from lnkit.io import atomic_path, atomic_write_json, atomic_write_text, file_digest, read_json
from lnkit.params import ParamError, RunParams, param
from lnkit.progress import progress_bar
from lnkit.rl.batch import rollout_batch
from lnkit.rl.curriculum import ORDERS, Curriculum, filter_by_pass_rate
from lnkit.rl.engines import BACKENDS, make_engine
from lnkit.rl.grpo import LOSS_TYPES, LossConfig, group_advantages, grpo_loss, token_logprobs
from lnkit.rl.rewards import REWARDS, accuracy_reward, get_rewards
from lnkit.rl.rollout import RolloutEngine
from lnkit.train.loop import LoopConfig, train_loop

NAME = "07_grpo"
RL_DOMAINS = ("math", "science", "code")
TARGET_CELLS = (("math", 4), ("math", 5), ("science", 1), ("science", 2), ("science", 3))
# Fields that change what the policy learns: a checkpoint is resumed only when these are unchanged.
TRAIN_FIELDS = ("seed", "device", "init", "pass_rate_model", "prompts", "pass_k", "max_pass_rate", "order",
                "curriculum_start", "curriculum_end", "curriculum_sigma", "steps", "num_iterations",
                "prompts_per_batch", "group_size", "temperature", "top_p", "max_new_tokens", "off_fraction",
                "rewards", "reward_weights", "loss_type", "epsilon_low", "epsilon_high", "beta", "lr", "warmup",
                "fp8_rollouts", "tis_cap", "rollout_backend", "drop_flat_groups", "ckpt_every", "spike_factor",
                "max_rollbacks")


@dataclass
class Params(RunParams):
    """Stage 07 parameters (fields match ``notebooks/07_grpo.ipynb``'s parameters cell)."""

    STAGE = NAME
    threads: int = param(2, "torch CPU threads", lo=0, hi=256)
    init: str = param("06_reasoning_sft", "the starting policy: a stage whose model/ to load, or a model folder")
    pass_rate_model: str = param("", "the model that estimates pass rates: a stage or a model folder; '' = init")
    prompts: dict[str, int] = param({"math": 160, "science": 160, "code": 60},
                                    "training prompts per domain (math, science, code), before the pass-rate filter")
    pass_k: int = param(8, "samples per prompt to estimate its pass rate (k)", lo=2, hi=256)
    max_pass_rate: float = param(0.75, "drop prompts estimated to pass at least this often", lo=0.0, hi=1.0)
    order: str = param("curriculum", "batching: the pass-rate curriculum, or uniform at random (the baseline)",
                       choices=list(ORDERS))
    curriculum_start: float = param(0.6, "curriculum: target pass rate of the first batch", lo=0.0, hi=1.0)
    curriculum_end: float = param(0.1, "curriculum: target pass rate of the last batch", lo=0.0, hi=1.0)
    curriculum_sigma: float = param(0.2, "curriculum: width of the Gaussian over pass rate", lo=0.01, hi=10.0)
    steps: int = param(60, "optimizer steps", lo=1)
    num_iterations: int = param(2, "optimizer steps per rollout batch (the paper: 2)", lo=1, hi=16)
    prompts_per_batch: int = param(16, "prompts per rollout batch", lo=1)
    group_size: int = param(8, "completions per prompt, G (the paper: 16)", lo=2, hi=256)
    temperature: float = param(1.0, "rollout sampling temperature (the paper: 1)", lo=0.05, hi=5.0)
    top_p: float = param(1.0, "rollout nucleus (the paper: 1)", lo=0.01, hi=1.0)
    max_new_tokens: int = param(128, "completion length limit (a cut-off completion earns no accuracy)", lo=1)
    off_fraction: float = param(0.25, "share of prompts asked with 'detailed thinking off'", lo=0.0, hi=1.0)
    rewards: list[str] = param(["accuracy", "format"], f"reward functions: {sorted(REWARDS)} or trl:<a function "
                               "of trl.rewards>", min_items=1)
    reward_weights: list[float] = param([1.0, 0.5], "weight of each reward in the sum", min_items=1)
    loss_type: str = param("grpo", "token aggregation of the loss (TRL's loss_type)", choices=list(LOSS_TYPES))
    epsilon_low: float = param(0.2, "clip below: ratio >= 1 - epsilon_low", lo=0.0, hi=0.99)
    epsilon_high: float = param(0.28, "clip above: ratio <= 1 + epsilon_high (DAPO's clip-higher)", lo=0.0, hi=10.0)
    beta: float = param(0.0, "weight of the k3 KL to the starting policy (0: no reference model)", lo=0.0)
    lr: float = param(1e-4, "peak learning rate (warmup then cosine to a tenth)", lo=1e-8, hi=1.0)
    warmup: int = param(4, "warmup steps", lo=0)
    drop_flat_groups: bool = param(True, "leave groups whose completions all scored the same out of the loss batch")
    fp8_rollouts: bool = param(False, "sample from an FP8 (e4m3, emulated on CPU) copy of the policy")
    tis_cap: float = param(0.0, "truncated importance sampling for rollouts from another policy: weight "
                           "min(pi / pi_rollout, cap); 0: off", lo=0.0)
    rollout_backend: str = param("torch", "rollout engine: torch (CPU or GPU) or vllm (GPU, the gpu extra; weights "
                                 "pushed into the running engine before each rollout batch)", choices=list(BACKENDS))
    rollout_slots: int = param(128, "rollout engine batch (KV-cache slots; torch backend)", lo=1)
    ckpt_every: int = param(10, "steps between checkpoints; a multiple of num_iterations", lo=1)
    spike_factor: float = param(25.0, "guard: roll back on a NaN/inf or a grad norm > this x the recent median; "
                                "0 turns it off", lo=0.0)
    max_rollbacks: int = param(3, "guard: rollbacks before a bad step stops the run", lo=0)
    eval_every: int = param(10, "steps between held-out curve points (greedy, both modes)", lo=1)
    curve_n: int = param(10, "curve: test items per domain and level", lo=1)
    eval_k: int = param(4, "final evaluation: samples per prompt with thinking on, math and science", lo=1, hi=64)
    eval_seed: int = param(0, "seed of the pass-rate samples and of every evaluation's samples; kept apart from "
                           "seed, so runs that differ in seed alone share them", lo=0)
    cache_dir: str = param("", "a folder shared between runs (a sweep's variants) where pass rates and the starting "
                           "model's evaluation are kept by what they depend on; relative to run_dir; '' = none")
    eval_max_new_tokens: int = param(128, "evaluation generation limit", lo=1)

    def check(self):
        try:
            get_rewards(self.rewards)
        except ValueError as e:
            raise ParamError(f"stage {self.STAGE}: parameter rewards: {e}") from None
        if len(self.reward_weights) != len(self.rewards):
            raise ParamError(f"stage {self.STAGE}: reward_weights has {len(self.reward_weights)} weight(s) for "
                             f"{len(self.rewards)} reward(s) {self.rewards}")
        bad = sorted(set(self.prompts) - set(RL_DOMAINS))
        if bad or not self.prompts or any(n < 1 for n in self.prompts.values()):
            raise ParamError(f"stage {self.STAGE}: prompts={self.prompts}: expected at least one of the verifiable "
                             f"domains {list(RL_DOMAINS)}, each with >= 1 prompt" + (f" (unknown: {bad})" if bad else ""))
        if self.ckpt_every % self.num_iterations:
            raise ParamError(f"stage {self.STAGE}: ckpt_every={self.ckpt_every} must be a multiple of "
                             f"num_iterations={self.num_iterations} (checkpoints fall between rollout batches)")
        if self.eval_every % self.num_iterations:
            raise ParamError(f"stage {self.STAGE}: eval_every={self.eval_every} must be a multiple of "
                             f"num_iterations={self.num_iterations} (curve points fall between rollout batches)")
        if self.steps % self.num_iterations:
            raise ParamError(f"stage {self.STAGE}: steps={self.steps} must be a multiple of "
                             f"num_iterations={self.num_iterations}")
        if 0 < self.tis_cap <= 1:
            raise ParamError(f"stage {self.STAGE}: tis_cap={self.tis_cap} must be 0 (off) or > 1")
        if 0 < self.spike_factor <= 1:
            raise ParamError(f"stage {self.STAGE}: spike_factor={self.spike_factor} must be 0 (guard off) or > 1")


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): the pass-rate sampling, each step's rollouts
    (generated, then trained ``num_iterations`` times with their prompts, about 256 tokens each) and the
    evaluations along the way."""
    prompts = sum(p.prompts.values())
    rollouts = p.steps * p.prompts_per_batch * p.group_size
    evals = (p.steps // max(1, p.eval_every) + 1) * p.curve_n * 3 * p.eval_k * p.eval_max_new_tokens
    return Work(generate=prompts * p.pass_k * p.max_new_tokens + rollouts * p.max_new_tokens + evals,
                train=rollouts * (p.max_new_tokens + 256) * p.num_iterations, gen_len=p.max_new_tokens, model="child")


def needs(p: Params) -> list[str]:
    return list(dict.fromkeys(["00_parent", *filter(None, map(stage_named, (p.init, p.pass_rate_model)))]))


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"target": {"start": 0.30, "final": 0.42, "low": 0.06, "high": 0.18},
    ...           "compliance": {"on": 0.99, "off": 1.0}})
    'target cells (math 4-5, science 1-3, on) 30.0% -> 42.0% (+12.0 points, 95% CI +6.0..+18.0); compliance 99% / 100%'
    """
    t, c = metrics["target"], metrics["compliance"]
    d = 100 * (t["final"] - t["start"])
    return (f"target cells (math 4-5, science 1-3, on) {t['start']:.1%} -> {t['final']:.1%} ({d:+.1f} points, 95% CI "
            f"{100 * t['low']:+.1f}..{100 * t['high']:+.1f}); compliance {c['on']:.0%} / {c['off']:.0%}")


# ---------------------------------------------------------------------------------------------- the data


def training_items(run_dir, prompts: dict[str, int]) -> list[Item]:
    """The first ``prompts[domain]`` training items of each domain, spread over its levels."""
    train = load_split(run_dir, "train")
    out = []
    for domain, n in prompts.items():
        items = [it for it in train if it.domain == domain]
        by_level = [[it for it in items if it.difficulty == lv] for lv in range(1, MAX_DIFFICULTY[domain] + 1)]
        picked = [lv[i] for i in range(max(map(len, by_level), default=0)) for lv in by_level if i < len(lv)]
        out += picked[:n]
    return out


def mode_of(p: Params, batch_index: int, item_id: str) -> str:
    """'on' or 'off' for one prompt of one rollout batch: a function of the seed, the batch and the prompt."""
    return "off" if random.Random(f"{p.seed}:mode:{batch_index}:{item_id}").random() < p.off_fraction else "on"


def estimate_pass_rates(engine: RolloutEngine, tok, items: list[Item], p: Params) -> dict[str, float]:
    """Each item's share of ``pass_k`` reasoning-on samples the accuracy reward accepts."""
    prompts = [render_prompt(it.prompt, "on") for it in items]
    ids = [tok(x, add_special_tokens=False)["input_ids"] for x in prompts]
    with progress_bar(total=len(ids) * p.pass_k, desc="pass rates", disable=not p.progress) as bar:
        rollouts = engine.sample(ids, n=p.pass_k, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                 top_p=p.top_p, seed=p.eval_seed + 7919, progress=bar)
    texts = [decode(tok, r) for r in rollouts]
    rewards = accuracy_reward([prompts[r.index] for r in rollouts], texts, item=[items[r.index] for r in rollouts],
                              finished=[r.finished for r in rollouts])
    per = [0.0] * len(items)
    for r, x in zip(rollouts, rewards):
        per[r.index] += x / p.pass_k
    return {it.id: round(v, 6) for it, v in zip(items, per)}


def decode(tok, rollout) -> str:
    """A completion's text, without its stop token."""
    return tok.decode(rollout.text_ids(), skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------- the stage


def run(p: Params) -> dict:
    """The whole stage; returns ``{"metrics", "log", "curve", "batches", "start_rows", "final_rows"}``."""
    stage.check_inputs(p, needs(p))
    device = p.setup_torch()
    policy, tok = load_model(model_dir(p.run_dir, p.init), device)
    rater, rater_tok = (policy, tok) if not p.pass_rate_model else load_model(model_dir(p.run_dir, p.pass_rate_model),
                                                                             device)
    if rater_tok.get_vocab() != tok.get_vocab():
        raise ParamError(f"stage {p.STAGE}: pass_rate_model={p.pass_rate_model!r} has another vocabulary than "
                         f"init={p.init!r} ({len(rater_tok)} vs {len(tok)} tokens); its samples cannot be scored as "
                         "this policy's")
    items = training_items(p.run_dir, p.prompts)
    by_id = {it.id: it for it in items}
    out = stage_dir(p.run_dir, NAME)
    identity = pass_rate_identity(p)
    cached = read_json(out / "pass_rates.json") if (out / "pass_rates.json").exists() else None
    if cached and cached.get("identity") == identity:
        rates = cached["pass_rates"]
    else:
        rates = shared(p, "pass_rates", identity, lambda: estimate_pass_rates(
            make_engine(p.rollout_backend, rater, rater_tok, max_batch=p.rollout_slots), tok, items, p))
    kept = filter_by_pass_rate(rates, p.max_pass_rate)  # an empty set stops here, before anything is written
    out = stage.start(p)
    atomic_write_json(out / "pass_rates.json", {"identity": identity, "pass_rates": rates})
    rater = None  # its weights are not needed past the pass rates
    test = load_split(p.run_dir, "test")
    start_rows = cached_eval(out / "eval_start.json", policy, tok, test, p)
    reference = None
    if p.beta > 0:
        reference, _ = load_model(model_dir(p.run_dir, p.init), device)
        reference.eval()
    trainer = GRPOTrainer(p, policy, tok, by_id, kept, reference, out, curve_items(test, p.curve_n))
    t0 = time.perf_counter()
    log = trainer.train()
    train_seconds = float(log[-1]["elapsed_s"]) if log else round(time.perf_counter() - t0, 1)
    trainer.curve_point(p.steps)
    save_model(policy, tok, out / "model")
    final_rows = run_eval(policy, tok, test, p)
    atomic_write_text(out / "eval_final_rows.jsonl", "".join(json.dumps(r) + "\n" for r in final_rows))
    metrics = summarize_run(p, start_rows, final_rows, log, trainer, rates, kept, train_seconds)
    atomic_write_json(out / "eval_summary.json", {"start": summarize(start_rows), "final": summarize(final_rows)})
    return {"metrics": metrics, "log": log, "curve": trainer.read_curve(), "batches": trainer.read_batches(),
            "start_rows": start_rows, "final_rows": final_rows}


def pass_rate_identity(p: Params) -> str:
    """What the pass rates depend on: reused across a resume only when all of it is unchanged."""
    model = model_dir(p.run_dir, p.pass_rate_model or p.init)
    manifest = model / "manifest.json"
    return json.dumps({"model": file_digest(manifest) if manifest.exists() else str(model), "prompts": p.prompts,
                       "k": p.pass_k, "seed": p.eval_seed, "max_new_tokens": p.max_new_tokens,
                       "temperature": p.temperature, "top_p": p.top_p}, sort_keys=True)


def shared(p: Params, kind: str, identity: str, compute):
    """``compute()``, or its result kept in ``cache_dir`` under this identity by an earlier run (a sweep's first
    variant estimates the pass rates and evaluates the starting model once for all of them)."""
    if not p.cache_dir:
        return compute()
    path = Path(p.run_dir) / p.cache_dir / f"{kind}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    if path.exists():
        try:
            saved = read_json(path)
        except (OSError, ValueError):
            saved = {}
        if saved.get("identity") == identity:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"identity": identity, "value": value})
    return value


def curve_items(test: list[Item], n: int) -> list[Item]:
    """``n`` test items per domain and level: the held-out set of the training curve."""
    out = []
    for domain in sorted({it.domain for it in test}):
        for level in range(1, MAX_DIFFICULTY[domain] + 1):
            out += [it for it in test if it.domain == domain and it.difficulty == level][:n]
    return out


def run_eval(model, tok, test: list[Item], p: Params) -> list[dict]:
    """Reasoning off (greedy) on the whole test split; reasoning on averaged over ``eval_k`` samples for the
    RL domains and one sample for the others."""
    kw = dict(max_new_tokens=p.eval_max_new_tokens, seed=p.eval_seed, backend="engine", progress=p.progress,
              batch_size=p.rollout_slots)
    rows = evaluate(model, tok, test, modes=("off",), **kw)
    rl = [it for it in test if it.domain in RL_DOMAINS and it.domain != "code"]
    rest = [it for it in test if it not in rl]
    rows += evaluate(model, tok, rl, modes=("on",), k=p.eval_k, **kw)
    rows += evaluate(model, tok, rest, modes=("on",), k=1, **kw)
    return rows


def cached_eval(path: Path, model, tok, test, p: Params) -> list[dict]:
    """The starting model's evaluation, computed once per stage folder and starting model (a resume reuses
    it; another starting model or other evaluation settings do not)."""
    init = model_dir(p.run_dir, p.init)
    manifest = init / "manifest.json"
    identity = json.dumps({"init": file_digest(manifest) if manifest.exists() else str(init), "k": p.eval_k,
                           "seed": p.eval_seed, "max_new_tokens": p.eval_max_new_tokens}, sort_keys=True)
    if path.exists():
        saved = read_json(path)
        if saved.get("identity") == identity:
            return saved["rows"]
    rows = shared(p, "eval_start", identity, lambda: run_eval(model, tok, test, p))
    atomic_write_json(path, {"identity": identity, "rows": rows})
    return rows


class GRPOTrainer:
    """The rollout, reward and loss side of one GRPO run, driving :func:`lnkit.train.loop.train_loop`.

    The loop asks for the batch of optimizer step ``s``; the first step of each rollout batch
    (``s % num_iterations == 0``) samples it with the current weights, the others reuse it, so the ratio in
    the loss is against the policy that sampled (pi_old)."""

    def __init__(self, p: Params, policy, tok, items: dict[str, Item], pass_rates: dict[str, float], reference,
                 out: Path, curve: list[Item]):
        self.p, self.policy, self.tok, self.items, self.reference, self.out = p, policy, tok, items, reference, out
        self.curve = curve
        self.curriculum = Curriculum(pass_rates, total_steps=p.steps // p.num_iterations, order=p.order,
                                     start_mean=p.curriculum_start, end_mean=p.curriculum_end,
                                     sigma=p.curriculum_sigma, seed=p.seed)
        self.engine = make_engine(p.rollout_backend, policy, tok, max_batch=p.rollout_slots, fp8=p.fp8_rollouts)
        self.rewards = get_rewards(p.rewards)
        self.loss_cfg = LossConfig(loss_type=p.loss_type, epsilon_low=p.epsilon_low, epsilon_high=p.epsilon_high,
                                   beta=p.beta, max_completion_length=p.max_new_tokens)
        self.cached: tuple[int, dict] | None = None

    # -------------------------------------------------------------------------------- the loop's hooks

    def train(self) -> list[dict]:
        p = self.p
        cfg = LoopConfig(steps=p.steps, lr=p.lr, warmup=p.warmup, ckpt_every=p.ckpt_every, weight_decay=0.0,
                         spike_factor=p.spike_factor, max_rollbacks=p.max_rollbacks)
        init = model_dir(p.run_dir, p.init)
        manifest = init / "manifest.json"
        fingerprint = (f"{ {f: getattr(p, f) for f in TRAIN_FIELDS} }|"
                       f"init={file_digest(manifest) if manifest.exists() else init}")
        return train_loop(self.policy, self.batch, cfg, self.out, desc="grpo", progress=p.progress,
                          fingerprint=fingerprint, loss_fn=self.loss)

    def batch(self, step: int) -> dict:
        p = self.p
        b = step // p.num_iterations
        if self.cached is None or self.cached[0] != b:
            if step % p.eval_every == 0:
                self.curve_point(step)
            self.cached = (b, self.rollout(b, step))
        batch = dict(self.cached[1])
        batch["n_tokens"] = int(batch["completion_mask"].sum())
        return batch

    def loss(self, model, batch: dict) -> dict:
        n = batch["completion_mask"].shape[1]
        logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"], n, self.p.temperature)
        loss, stats = grpo_loss(logps, batch["old_logps"], batch["advantages"], batch["completion_mask"],
                                self.loss_cfg, ref_logps=batch.get("ref_logps"), is_weights=batch.get("is_weights"),
                                num_items=batch["n_tokens_all"])
        if self.p.beta == 0:  # no reference: report how far the update moved from the sampling policy instead
            mask = batch["completion_mask"].float()
            drift = torch.exp(batch["old_logps"] - logps.detach()) - (batch["old_logps"] - logps.detach()) - 1
            stats["kl"] = float((drift * mask).sum() / mask.sum().clamp(min=1))
        return {"loss": loss, **stats, **batch["stats"]}

    # -------------------------------------------------------------------------------- rollouts

    def rollout(self, b: int, step: int) -> dict:
        p = self.p
        ids = self.curriculum.batch(b, p.prompts_per_batch)
        modes = [mode_of(p, b, i) for i in ids]
        prompts = [render_prompt(self.items[i].prompt, m) for i, m in zip(ids, modes)]
        encoded = [self.tok(x, add_special_tokens=False)["input_ids"] for x in prompts]
        # the torch engine reads the current weights itself (FP8: re-quantised) at every call; vLLM is pushed them
        if p.rollout_backend != "torch":
            self.engine.load_weights(self.policy)
        rollouts = self.engine.sample(encoded, n=p.group_size, max_new_tokens=p.max_new_tokens,
                                      temperature=p.temperature, top_p=p.top_p, seed=p.seed * 100_003 + b)
        texts = [decode(self.tok, r) for r in rollouts]
        cols = {"item": [self.items[ids[r.index]] for r in rollouts], "finished": [r.finished for r in rollouts],
                "mode": [modes[r.index] for r in rollouts]}
        # completions in TRL's conversational form: TRL's reward functions read completion[0]["content"]
        convo = [[{"role": "assistant", "content": t}] for t in texts]
        asked = [prompts[r.index] for r in rollouts]  # called by keyword, as TRL's trainer calls reward functions
        per_reward = [[float(x) for x in fn(prompts=asked, completions=convo, **cols)] for fn in self.rewards]
        total = torch.tensor([sum(w * rs[j] for w, rs in zip(p.reward_weights, per_reward))
                              for j in range(len(rollouts))])
        adv = group_advantages(total, p.group_size)
        flat = (total.view(-1, p.group_size).std(1) == 0).repeat_interleave(p.group_size)
        keep = [j for j in range(len(rollouts)) if not (p.drop_flat_groups and flat[j])] or list(range(len(rollouts)))
        device = next(self.policy.parameters()).device
        batch = rollout_batch([rollouts[j] for j in keep], self.tok.pad_token_id, device)
        mask = batch["completion_mask"].float()
        with torch.no_grad():
            exact = None
            if p.fp8_rollouts or p.tis_cap > 0:  # pi_old is the trained policy; the sampler was another one
                exact = token_logprobs(self.policy, batch["input_ids"], batch["attention_mask"], mask.shape[1],
                                       p.temperature)
            ref = None
            if self.reference is not None:
                ref = token_logprobs(self.reference, batch["input_ids"], batch["attention_mask"], mask.shape[1],
                                     p.temperature)
        old = exact if exact is not None else batch["sampling_logps"]
        gap = float(((exact - batch["sampling_logps"]).abs() * mask).sum() / mask.sum()) if exact is not None else 0.0
        is_w = None
        if p.tis_cap > 0:
            is_w = torch.exp(exact - batch["sampling_logps"]).clamp(max=p.tis_cap) * mask
        lengths = [len(r.completion_ids) for r in rollouts]
        acc_i = p.rewards.index("accuracy") if "accuracy" in p.rewards else None
        fmt_i = p.rewards.index("format") if "format" in p.rewards else None
        stats = {
            "reward_mean": float(total.mean()), "reward_std": float(total.std()),
            "accuracy_reward": statistics.mean(per_reward[acc_i]) if acc_i is not None else float("nan"),
            "format_reward": statistics.mean(per_reward[fmt_i]) if fmt_i is not None else float("nan"),
            "flat_groups": float(flat.view(-1, p.group_size)[:, 0].float().mean()),
            "completion_len": statistics.mean(lengths), "truncated": 1 - statistics.mean(r.finished for r in rollouts),
            "fp8_logprob_gap": gap, "target_pass_rate": self.curriculum.mean_at(b),
            "batch_pass_rate": statistics.mean(self.curriculum.pass_rates[i] for i in ids),
        }
        self.record_batch(b, step, ids, modes, rollouts, texts, total, stats)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "completion_mask": batch["completion_mask"], "old_logps": old, "advantages": adv[keep].to(device),
                **({"ref_logps": ref} if ref is not None else {}), **({"is_weights": is_w} if is_w is not None else {}),
                "n_tokens_all": float(mask.sum()), "stats": stats}

    # -------------------------------------------------------------------------------- records

    def record_batch(self, b, step, ids, modes, rollouts, texts, total, stats):
        """Append this rollout batch to ``batches.jsonl`` (rewritten whole, atomically; entries of this batch
        or later from an interrupted attempt are replaced)."""
        best = sorted(range(len(rollouts)), key=lambda j: -float(total[j]))[:3]
        entry = {"batch": b, "step": step, "prompts": ids, "modes": modes,
                 "pass_rates": [self.curriculum.pass_rates[i] for i in ids],
                 "target": self.curriculum.target(b), "target_mean": self.curriculum.mean_at(b),
                 "rewards": [round(float(x), 4) for x in total], **{k: round(v, 5) for k, v in stats.items()},
                 "best": [{"prompt": ids[rollouts[j].index], "mode": modes[rollouts[j].index],
                           "reward": round(float(total[j]), 4), "completion": texts[j]} for j in best]}
        rows = [e for e in self.read_batches() if e["batch"] < b] + [entry]
        atomic_write_text(self.out / "batches.jsonl", "".join(json.dumps(e) + "\n" for e in rows))

    def read_batches(self) -> list[dict]:
        path = self.out / "batches.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []

    def curve_point(self, step: int) -> None:
        """Greedy held-out accuracy, reasoning on and off, on the curve items: one row per (mode, domain) and
        one per target cell, in ``eval_curve.csv`` (rows of this step or later are replaced)."""
        rows = evaluate(self.policy, self.tok, self.curve, modes=("off", "on"), max_new_tokens=self.p.eval_max_new_tokens,
                        seed=self.p.eval_seed, backend="engine", progress=False, batch_size=self.p.rollout_slots)
        self.policy.train()
        points = [{"step": step, "mode": s["mode"], "domain": s["domain"], "accuracy": s["accuracy"],
                   "compliance": s["compliance"], "mean_tokens": s["mean_tokens"]}
                  for s in summarize(rows, by=("mode", "domain"))]
        target = [r["correct"] for r in rows if r["mode"] == "on" and (r["domain"], r["difficulty"]) in TARGET_CELLS]
        if target:
            points.append({"step": step, "mode": "on", "domain": "target", "accuracy": round(statistics.mean(target), 4),
                           "compliance": "", "mean_tokens": ""})
        old = [r for r in self.read_curve() if int(r["step"]) < step]
        with atomic_path(self.out / "eval_curve.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, ["step", "mode", "domain", "accuracy", "compliance", "mean_tokens"])
            w.writeheader()
            w.writerows(old + points)

    def read_curve(self) -> list[dict]:
        path = self.out / "eval_curve.csv"
        return list(csv.DictReader(path.open())) if path.exists() else []


# ---------------------------------------------------------------------------------------------- the figures


def target_accuracy(rows: list[dict]) -> tuple[float, dict[tuple, dict[str, float]]]:
    """Reasoning-on pass@1 on the target cells (each cell weighs the same) and each item's mean correctness."""
    per_item: dict[tuple, dict[str, list]] = {}
    for r in rows:
        cell = (r["domain"], r["difficulty"])
        if r["mode"] == "on" and cell in TARGET_CELLS:
            per_item.setdefault(cell, {}).setdefault(r["id"], []).append(float(r["correct"]))
    means = {c: {i: statistics.mean(v) for i, v in items.items()} for c, items in per_item.items()}
    if not means:  # a test split without those levels (the smoke run's)
        return float("nan"), means
    return statistics.mean(statistics.mean(m.values()) for m in means.values()), means


def bootstrap_change(start: dict, final: dict, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the change in the target score, resampling items within each cell (paired)."""
    rng = random.Random(seed)
    diffs = []
    cells = sorted(set(start) & set(final))
    if not cells:
        return float("nan"), float("nan")
    for _ in range(n):
        total = 0.0
        for c in cells:
            ids = sorted(set(start[c]) & set(final[c]))
            pick = [rng.choice(ids) for _ in ids]
            total += statistics.mean(final[c][i] - start[c][i] for i in pick)
        diffs.append(total / len(cells))
    diffs.sort()
    return diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]


def summarize_run(p, start_rows, final_rows, log, trainer, rates, kept, train_seconds) -> dict:
    s0, per0 = target_accuracy(start_rows)
    s1, per1 = target_accuracy(final_rows)
    low, high = bootstrap_change(per0, per1, seed=p.seed)
    dom0 = {(s["mode"], s["domain"]): s for s in summarize(start_rows, by=("mode", "domain"))}
    dom1 = {(s["mode"], s["domain"]): s for s in summarize(final_rows, by=("mode", "domain"))}
    change = {f"{m}/{d}": round(dom1[(m, d)]["accuracy"] - dom0[(m, d)]["accuracy"], 4) for (m, d) in dom1 if d != "all"}
    batches = trainer.read_batches()
    return {
        "target": {"start": round(s0, 4), "final": round(s1, 4), "change": round(s1 - s0, 4), "low": round(low, 4),
                   "high": round(high, 4), "cells": [f"{d} {lv}" for d, lv in TARGET_CELLS]},
        "accuracy_change": change,
        "worst_domain_change": min(change.values()) if change else 0.0,
        "accuracy": {f"{m}/{d}": dom1[(m, d)]["accuracy"] for (m, d) in dom1},
        "start_accuracy": {f"{m}/{d}": dom0[(m, d)]["accuracy"] for (m, d) in dom0},
        "compliance": {m: dom1[(m, "all")]["compliance"] for m in ("on", "off")},
        "leakage_off": dom1[("off", "all")]["leakage"],
        "mean_tokens": {m: dom1[(m, "all")]["mean_tokens"] for m in ("on", "off")},
        "prompts": {"estimated": len(rates), "kept": len(kept), "max_pass_rate": p.max_pass_rate},
        "flat_groups": round(statistics.mean(b["flat_groups"] for b in batches), 4) if batches else None,
        "fp8_logprob_gap": round(statistics.mean(b["fp8_logprob_gap"] for b in batches), 5) if batches else None,
        "train_seconds": train_seconds, "rollbacks": int(log[-1].get("rollbacks", 0)) if log else 0,
        "order": p.order,
    }
