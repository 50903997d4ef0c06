"""Stage 08: alignment: RLOO for instruction following, a reward model, and online RPO (paper Section 6).

Starting from the stage-07 model (``init``; any stage or model folder):

1. **RLOO** (6.1) on instruction prompts in IFEval's terms (:mod:`lnkit.data.ifeval`): ``rloo_k`` samples
   per prompt, the verifier reward (all instructions followed, or the share followed: ``rloo_reward``) plus the
   toggle's format reward, the KL to the starting policy inside the reward, leave-one-out advantages and
   TRL's clipped sequence loss (:mod:`lnkit.rl.rloo`), on the rollout engine and training loop of stage 07.
2. **A reward model** (:mod:`lnkit.rl.reward_model`): the policy's architecture with a scalar head, trained
   Bradley-Terry (or attribute regression) on preference pairs over chat prompts about the world's facts
   (:mod:`lnkit.data.chatworld`): answers sampled from the RLOO policy, labelled by noisy simulated
   annotators. It reads the question and the final answer, as the gold judge does (no thinking, no system
   prompt). Its pairwise accuracy is measured on held-out pairs labelled by the hidden gold judge.
   ``reward_model`` names a trained one instead.
3. **Online RPO** (6.2): ``rpo_iterations`` rounds of sampling ``rpo_samples`` answers per chat prompt from
   the current policy, pairing the reward model's best and worst of those in the mode's format (it cannot
   see a broken think block), and training the RPO loss
   (:mod:`lnkit.rl.preference`) against the round's starting policy. ``pair_file`` trains offline on a pair
   file instead (LN-Nano's use). With ``dpo_baseline``, DPO trains on the very same pairs from the same start.
4. **Evaluation**: IFEval's four metrics on held-out instruction prompts, both modes; the Arena-Hard analog,
   the win rate against ``baseline``'s answers on held-out chat prompts judged by the gold judge (ties half,
   bootstrap interval) and the same win rate as the reward model sees it, per round; every domain's accuracy
   on the test split and the toggle's compliance, before and after.

Resume: each phase (``rloo/``, ``reward_model/``, ``rpo_1/``...) checkpoints through the shared loop and
writes its model atomically when done; a rerun skips finished phases and resumes the unfinished one. Other
parameters or other starting models (``identity.json``) start the stage over.
Writes ``<run_dir>/08_alignment/``: ``model/`` (the aligned policy), ``reward_model/``, ``pairs_<round>.jsonl``,
``phases.csv`` (the win rates and IFEval metrics after each phase), ``eval_*.jsonl`` and ``metrics.json``.
Notebook: ``notebooks/08_alignment.ipynb``.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import statistics
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lnkit import stage
from lnkit.checkpoints import load_model, model_dir, save_model, stage_named
from lnkit.data import chatworld, ifeval
from lnkit.data.chat import render_prompt, split_response
from lnkit.data.pairs import Pair, read_pairs, write_pairs
from lnkit.data.splits import load_split, load_world
from lnkit.eval import compliant, evaluate, summarize
from lnkit.gpuhours import Work
from lnkit.io import atomic_path, atomic_write_json, atomic_write_text, file_digest, read_json
from lnkit.params import ParamError, RunParams, param
from lnkit.rl.batch import rollout_batch
from lnkit.rl.grpo import token_logprobs
from lnkit.rl.preference import (
    PREFERENCE_LOSSES,
    RPO_DISTANCES,
    implicit_reward_gap,
    preference_loss,
    sequence_logps,
)
from lnkit.rl.reward_model import (
    OBJECTIVES,
    RewardModel,
    attribute_loss,
    bradley_terry_loss,
    check_vocabulary,
    conversation,
    encode,
    load_reward_model,
    save_reward_model,
    score_texts,
)
from lnkit.rl.rewards import format_reward
from lnkit.rl.rloo import rloo_advantages, rloo_loss, sequence_kl
from lnkit.rl.rollout import Rollout, TorchEngine
from lnkit.train.loop import LoopConfig, train_loop

NAME = "08_alignment"


@dataclass
class Params(RunParams):
    """Stage 08 parameters (fields match ``notebooks/08_alignment.ipynb``'s parameters cell)."""

    STAGE = NAME
    threads: int = param(2, "torch CPU threads", lo=0, hi=256)
    init: str = param("07_grpo", "the starting policy: a stage whose model/ to load, or a model folder")
    baseline: str = param("06_reasoning_sft", "the Arena-Hard analog's opponent: a stage or a model folder")
    # instruction following, RLOO
    if_train: int = param(300, "instruction prompts to train on (IFEval's layout, 1-3 instructions each)", lo=1)
    if_test: int = param(120, "held-out instruction prompts", lo=1)
    if_instructions: list[str] = param(list(ifeval.TAUGHT), "the IFEval instruction ids the prompts use (default: "
                                       "the types the tiny world's SFT data teaches)", min_items=1)
    rloo_steps: int = param(60, "RLOO optimizer steps (one rollout batch each); 0 skips RLOO", lo=0)
    rloo_k: int = param(8, "samples per prompt (k)", lo=2, hi=64)
    rloo_prompts_per_batch: int = param(16, "prompts per RLOO batch", lo=1)
    rloo_reward: str = param("all", "verifier reward: 1 when every instruction is followed, or the share followed",
                             choices=["all", "fraction"])
    rloo_beta: float = param(0.05, "weight of the KL to the starting policy in the reward", lo=0.0)
    rloo_lr: float = param(3e-4, "RLOO learning rate", lo=1e-8, hi=1.0)
    off_fraction: float = param(0.5, "share of prompts asked with 'detailed thinking off' (RLOO and RPO)",
                                lo=0.0, hi=1.0)
    # chat and the reward model
    chat_train: int = param(500, "chat prompts to train on", lo=2)
    chat_test: int = param(100, "held-out chat prompts (the Arena-Hard analog)", lo=2)
    rm_samples: int = param(4, "answers sampled per chat prompt to build the reward model's pairs", lo=2, hi=32)
    rm_pairs_per_prompt: int = param(6, "answer pairs labelled per chat prompt (at most all pairs of its samples)",
                                     lo=1)
    rm_objective: str = param("bradley_terry", "reward model objective", choices=list(OBJECTIVES))
    rm_steps: int = param(300, "reward model optimizer steps", lo=1)
    rm_batch: int = param(32, "pairs per reward model step", lo=1)
    rm_lr: float = param(5e-4, "reward model learning rate", lo=1e-8, hi=1.0)
    annotator_noise: float = param(0.7, "annotators' noise on each 0-4 attribute (standard deviation)", lo=0.0)
    annotator_flip: float = param(0.1, "chance an annotator picks the other answer", lo=0.0, hi=0.5)
    reward_model: str = param("", "a trained reward model folder to use instead of training one")
    # RPO
    preference_loss: str = param("rpo", "preference objective", choices=list(PREFERENCE_LOSSES))
    rpo_distance: str = param("bwd_kl", "RPO's distance (bwd_kl: the paper's)", choices=list(RPO_DISTANCES))
    beta: float = param(0.1, "beta: weight of the policy's implicit reward (log-ratio to the reference)")
    eta: float = param(1.0, "eta: weight of the reward model's score gap (RPO)")
    rpo_iterations: int = param(2, "online rounds (sample, score, train)", lo=0, hi=20)
    rpo_prompts: int = param(200, "chat prompts per round", lo=1)
    rpo_samples: int = param(4, "answers sampled per prompt per round; the best and worst make a pair", lo=2, hi=32)
    rpo_steps: int = param(40, "optimizer steps per round", lo=1)
    rpo_batch: int = param(16, "pairs per step", lo=1)
    rpo_lr: float = param(5e-5, "RPO learning rate", lo=1e-8, hi=1.0)
    pair_file: str = param("", "offline RPO: a pair file (JSONL) to train on instead of sampled rounds")
    dpo_baseline: bool = param(True, "also train DPO on the same pairs from the same start (RPO vs DPO)")
    # generation and evaluation
    temperature: float = param(1.0, "sampling temperature (training rollouts and pair answers)", lo=0.05, hi=5.0)
    max_new_tokens: int = param(96, "generation limit", lo=1)
    eval_max_new_tokens: int = param(128, "generation limit of the test split's evaluation", lo=1)
    rollout_slots: int = param(128, "rollout engine batch", lo=1)
    ckpt_every: int = param(10, "steps between checkpoints", lo=1)

    def check(self):
        if self.beta <= 0:
            raise ParamError(f"stage {self.STAGE}: beta={self.beta} must be > 0")
        if self.eta <= 0:
            raise ParamError(f"stage {self.STAGE}: eta={self.eta} must be > 0")
        for i in self.if_instructions:
            try:
                ifeval.instruction(i)
            except ifeval.UnknownInstruction as e:
                raise ParamError(f"stage {self.STAGE}: parameter if_instructions: {e}") from None


def work(p: Params, run: dict, config: dict) -> Work:
    """What this stage computes (:mod:`lnkit.gpuhours`): RLOO rollouts and updates, the reward model's pairs
    and training, each RPO round's samples and updates (with the reference's forward), and the evaluation;
    sequences are the answer plus a prompt of about 256 tokens."""
    seq = p.max_new_tokens + 256
    rloo = p.rloo_steps * p.rloo_prompts_per_batch * p.rloo_k
    rm = 0 if p.reward_model else p.rm_steps * p.rm_batch * 2 * seq
    rpo_pairs = p.rpo_iterations * p.rpo_steps * p.rpo_batch * 2 * seq
    gen = (rloo + p.chat_train * p.rm_samples + p.rpo_iterations * p.rpo_prompts * p.rpo_samples) * p.max_new_tokens
    gen += 2 * (p.if_test + p.chat_test) * p.eval_max_new_tokens
    return Work(generate=gen, train=rloo * seq + rm + rpo_pairs, forward=rpo_pairs, gen_len=p.max_new_tokens,
                model="child")


def needs(p: Params) -> list[str]:
    return list(dict.fromkeys(["00_parent", *filter(None, map(stage_named, (p.init, p.baseline)))]))


def headline(metrics: dict) -> str:
    """One line for the runner's table.

    >>> headline({"ifeval": {"on": {"start": 0.2, "final": 0.35}, "off": {"start": 0.3, "final": 0.5}},
    ...           "win_rate": {"on": 0.7, "off": 0.66}, "rm_accuracy": 0.9})
    'IFEval prompt strict on 20% -> 35%, off 30% -> 50%; win rate vs baseline 70% / 66%; RM accuracy 90%'
    """
    f, w = metrics["ifeval"], metrics["win_rate"]
    return (f"IFEval prompt strict on {f['on']['start']:.0%} -> {f['on']['final']:.0%}, off {f['off']['start']:.0%} "
            f"-> {f['off']['final']:.0%}; win rate vs baseline {w['on']:.0%} / {w['off']:.0%}; "
            f"RM accuracy {metrics['rm_accuracy']:.0%}")


# ---------------------------------------------------------------------------------------------- sampling


def mode_of(p: Params, tag: str, key: str) -> str:
    return "off" if random.Random(f"{p.seed}:{tag}:{key}").random() < p.off_fraction else "on"


def sample_answers(engine: TorchEngine, tok, prompts: list[str], modes: list[str], *, n: int, p: Params, seed: int,
                   greedy: bool = False) -> list[list[Rollout]]:
    """``n`` rollouts per prompt (rendered in its mode); greedy: one, at temperature 0."""
    ids = [tok(render_prompt(q, m), add_special_tokens=False)["input_ids"] for q, m in zip(prompts, modes)]
    out = engine.sample(ids, n=1 if greedy else n, max_new_tokens=p.max_new_tokens,
                        temperature=0.0 if greedy else p.temperature, seed=seed)
    per = [[] for _ in prompts]
    for r in out:
        per[r.index].append(r)
    return per


def rm_view(prompt: str, response: str) -> str:
    """What the reward model reads, as the gold judge does: the question and the final answer (no thinking,
    no system prompt), so answers with thinking on and off are scored alike."""
    return conversation(prompt, split_response(response)[1].strip(), None)


def text_of(tok, r: Rollout) -> str:
    return tok.decode(r.text_ids(), skip_special_tokens=False)


def answer_of(tok, r: Rollout) -> str:
    """The final answer (after the think block), what the gold judge and IFEval read (cut off or not)."""
    return split_response(text_of(tok, r))[1].strip()


def pair_rollouts(tok, pairs: list[Pair]) -> tuple[list[Rollout], list[Rollout]]:
    """Chosen and rejected answers as rollouts of their prompts (stop token appended): the batch layout."""
    eot = tok.convert_tokens_to_ids("<|eot_id|>")

    def one(prompt, mode, text):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [eot]
        return Rollout(0, tok(render_prompt(prompt, mode), add_special_tokens=False)["input_ids"], ids,
                       [0.0] * len(ids), True)

    return ([one(x.prompt, x.mode, x.chosen) for x in pairs], [one(x.prompt, x.mode, x.rejected) for x in pairs])


# ---------------------------------------------------------------------------------------------- the stage


def run(p: Params) -> dict:
    stage.check_inputs(p, needs(p))
    device = p.setup_torch()
    policy, tok = load_model(model_dir(p.run_dir, p.init), device)
    base_model, base_tok = load_model(model_dir(p.run_dir, p.baseline), device)
    if base_tok.get_vocab() != tok.get_vocab():
        raise ParamError(f"stage {p.STAGE}: baseline={p.baseline!r} has another vocabulary than init={p.init!r}")
    rm = None
    if p.reward_model:
        rm, rm_tok = load_reward_model(p.reward_model, device)
        try:
            check_vocabulary(rm_tok, tok, p.reward_model)
        except ValueError as e:
            raise ParamError(f"stage {p.STAGE}: parameter reward_model: {e}") from None
    offline = None
    if p.pair_file:
        offline, skipped = read_pairs(p.pair_file)  # a file with no usable row stops here, nothing written
    world = load_world(p.run_dir)
    if_train = ifeval.make_prompts(world, p.if_train, seed=p.seed, ids=p.if_instructions)
    if_test = ifeval.make_prompts(world, p.if_test, seed=p.seed + 1, ids=p.if_instructions,
                                  exclude={x.key for x in if_train})
    chat_train, chat_test = chatworld.split_prompts(world, p.chat_train, p.chat_test, seed=p.seed)
    fresh_start(p)
    out = stage.start(p)
    atomic_write_json(out / IDENTITY, identity(p))
    if offline is not None:
        atomic_write_json(out / "pair_file_report.json", {"file": p.pair_file, "pairs": len(offline),
                                                          "skipped": skipped})
    test = load_split(p.run_dir, "test")
    ctx = Context(p, out, tok, world, if_test, chat_test)
    engine = TorchEngine(policy, tok, max_batch=p.rollout_slots)
    # the opponent's answers, once: greedy, both modes (the Arena-Hard analog's fixed baseline)
    ctx.baseline_answers = ctx.chat_answers(TorchEngine(base_model, tok, max_batch=p.rollout_slots))
    del base_model
    start_rows = cached(out / "eval_start.json", lambda: evaluate_domains(policy, tok, test, p))
    ctx.record("start", policy, engine)

    # 1. RLOO for instruction following
    if p.rloo_steps:
        phase_model(out / "rloo", policy, tok, lambda: train_rloo(p, policy, tok, engine, if_train, out / "rloo"))
        ctx.record("rloo", policy, engine)

    # 2. the reward model
    if rm is None:
        rm_dir = out / "reward_model"
        if not (rm_dir / "reward.json").exists():
            train_reward_model(p, policy, tok, engine, world, chat_train, rm_dir)
        rm, _ = load_reward_model(rm_dir, device)
    ctx.rm = rm
    rm_accuracy = held_out_rm_accuracy(p, rm, tok, engine, world, chat_test, out)

    # 3. RPO rounds (and DPO on the same pairs)
    start_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    rounds = 1 if offline is not None else p.rpo_iterations
    all_pairs = []
    for r in range(1, rounds + 1):
        pairs = offline if offline is not None else round_pairs(p, policy, tok, engine, rm, chat_train, r, out)
        if not pairs:  # every prompt's answers alike, or scored alike: nothing to learn this round
            continue
        all_pairs.append(pairs)
        phase_model(out / f"rpo_{r}", policy, tok,
                    lambda pairs=pairs, r=r: train_preference(p, policy, tok, pairs, rm, p.preference_loss,
                                                              out / f"rpo_{r}"))
        ctx.record(f"{p.preference_loss}_{r}", policy, engine)
    save_model(policy, tok, out / "model")
    dpo = None
    if p.dpo_baseline and p.preference_loss != "dpo" and all_pairs:
        final_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        policy.load_state_dict(start_state)
        for r, pairs in enumerate(all_pairs, 1):
            phase_model(out / f"dpo_{r}", policy, tok,
                        lambda pairs=pairs, r=r: train_preference(p, policy, tok, pairs, rm, "dpo", out / f"dpo_{r}"))
        dpo = ctx.record(f"dpo_{len(all_pairs)}", policy, engine)
        policy.load_state_dict(final_state)
    final_rows = evaluate_domains(policy, tok, test, p)
    atomic_write_text(out / "eval_final_rows.jsonl", "".join(json.dumps(x) + "\n" for x in final_rows))
    metrics = summarize_run(p, ctx, start_rows, final_rows, rm_accuracy, dpo)
    return {"metrics": metrics, "phases": ctx.read_phases()}


# Parameters that do not change what the stage computes: a rerun that changes only these keeps its phases.
RUNTIME_FIELDS = ("threads", "progress", "figures_dir", "run_dir")


IDENTITY = "identity.json"


def identity(p: Params) -> dict:
    """What the stage's results depend on: its parameters and the models it starts from (by manifest)."""
    models = {}
    for role in ("init", "baseline"):
        manifest = model_dir(p.run_dir, getattr(p, role)) / "manifest.json"
        models[role] = file_digest(manifest) if manifest.exists() else str(manifest.parent)
    return {**{k: v for k, v in p.to_dict().items() if k not in RUNTIME_FIELDS}, "models": models}


def fingerprint(p: Params) -> str:
    return json.dumps(identity(p), sort_keys=True)


def fresh_start(p: Params) -> None:
    """A rerun with other parameters or other starting models starts over: the finished phases, pairs and
    evaluations in the stage folder belong to the old ones (a rerun with the same ones resumes them)."""
    folder = stage.stage_path(p)
    if not folder.exists():
        return
    try:
        same = read_json(folder / IDENTITY) == json.loads(fingerprint(p))
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(folder)


def cached(path: Path, compute):
    if path.exists():
        return read_json(path)
    value = compute()
    atomic_write_json(path, value)
    return value


def phase_model(folder: Path, policy, tok, train) -> None:
    """Run a training phase once: a finished phase (its ``model/`` written) is loaded instead."""
    done = folder / "model"
    if (done / "config.json").exists():
        finished, _ = load_model(done, next(policy.parameters()).device)
        policy.load_state_dict(finished.state_dict())
        return
    train()
    save_model(policy, tok, done)


def evaluate_domains(model, tok, test, p: Params) -> list[dict]:
    """The test split, both modes, greedy (the domains' accuracy and the toggle's compliance)."""
    rows = evaluate(model, tok, test, modes=("off", "on"), max_new_tokens=p.eval_max_new_tokens, seed=p.seed,
                    backend="engine",
                    progress=p.progress, batch_size=p.rollout_slots)
    for r in rows:
        r.pop("response", None)
    return rows


class Context:
    """What the phases' evaluations share: held-out prompts, the baseline's answers, the reward model."""

    def __init__(self, p, out, tok, world, if_test, chat_test):
        self.p, self.out, self.tok, self.world, self.if_test, self.chat_test = p, out, tok, world, if_test, chat_test
        self.rm = None
        self.baseline_answers: dict[str, list[str]] = {}
        self._baseline_rm: dict[str, list[float]] = {}  # the reward model's scores of those (it is fixed once set)

    def chat_answers(self, engine) -> dict[str, list[str]]:
        out = {}
        for mode in ("on", "off"):
            per = sample_answers(engine, self.tok, [c.prompt for c in self.chat_test], [mode] * len(self.chat_test),
                                 n=1, p=self.p, seed=self.p.seed, greedy=True)
            out[mode] = [answer_of(self.tok, rs[0]) for rs in per]
        return out

    def ifeval_metrics(self, engine) -> dict[str, dict]:
        res = {}
        for mode in ("on", "off"):
            per = sample_answers(engine, self.tok, [x.prompt for x in self.if_test], [mode] * len(self.if_test), n=1,
                                 p=self.p, seed=self.p.seed, greedy=True)
            rows = [ifeval.follow(answer_of(self.tok, rs[0]), x.instruction_id_list, x.kwargs)
                    for x, rs in zip(self.if_test, per)]
            res[mode] = ifeval.score(rows)
        return res

    def record(self, phase: str, policy, engine) -> dict:
        """IFEval and the win rates (gold judge; reward model once there is one) after a phase: a row per mode
        in ``phases.csv`` (rewritten whole; a phase's earlier row is replaced)."""
        engine.load_weights(policy)
        answers = self.chat_answers(engine)
        ife = self.ifeval_metrics(engine)
        rows = []
        for mode in ("on", "off"):
            gold = [chatworld.win(chatworld.judge(self.world, c, a)["score"],
                                  chatworld.judge(self.world, c, b)["score"])
                    for c, a, b in zip(self.chat_test, answers[mode], self.baseline_answers[mode])]
            low, high = bootstrap_mean(gold, seed=self.p.seed)
            row = {"phase": phase, "mode": mode, "win_rate_gold": round(statistics.mean(gold), 4),
                   "win_low": round(low, 4), "win_high": round(high, 4),
                   "gold_score": round(statistics.mean(chatworld.judge(self.world, c, a)["score"]
                                                      for c, a in zip(self.chat_test, answers[mode])), 4),
                   "win_rate_rm": "", **ife[mode]}
            if self.rm is not None:
                mine = score_texts(self.rm, self.tok, [rm_view(c.prompt, a) for c, a in
                                                       zip(self.chat_test, answers[mode])])
                if mode not in self._baseline_rm:
                    self._baseline_rm[mode] = score_texts(self.rm, self.tok, [
                        rm_view(c.prompt, b) for c, b in zip(self.chat_test, self.baseline_answers[mode])])
                theirs = self._baseline_rm[mode]
                row["win_rate_rm"] = round(statistics.mean(chatworld.win(round(a, 4), round(b, 4))
                                                           for a, b in zip(mine, theirs)), 4)
            rows.append(row)
        old = [r for r in self.read_phases() if r["phase"] != phase]
        fields = ["phase", "mode", "win_rate_gold", "win_low", "win_high", "gold_score", "win_rate_rm",
                  "prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"]
        with atomic_path(self.out / "phases.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(old + rows)
        atomic_write_json(self.out / f"answers_{phase}.json", {"prompts": [c.prompt for c in self.chat_test],
                                                               "answers": answers})
        return {r["mode"]: r for r in rows}

    def read_phases(self) -> list[dict]:
        path = self.out / "phases.csv"
        return list(csv.DictReader(path.open())) if path.exists() else []


def bootstrap_mean(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choice(values) for _ in values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


# ---------------------------------------------------------------------------------------------- RLOO


def train_rloo(p: Params, policy, tok, engine, prompts: list[ifeval.IFPrompt], folder: Path) -> None:
    reference, _ = load_model(model_dir(p.run_dir, p.init), next(policy.parameters()).device)
    reference.eval()

    def batch(step: int) -> dict:
        rng = random.Random(f"{p.seed}:rloo:{step}")
        chosen = rng.sample(prompts, min(p.rloo_prompts_per_batch, len(prompts)))
        modes = [mode_of(p, "rloo", x.key) for x in chosen]
        engine.load_weights(policy)
        per = sample_answers(engine, tok, [x.prompt for x in chosen], modes, n=p.rloo_k, p=p,
                             seed=p.seed * 7_919 + step)
        rollouts = [r for rs in per for r in rs]
        texts = [text_of(tok, r) for r in rollouts]
        verdicts = [ifeval.follow(answer_of(tok, r), chosen[r.index].instruction_id_list, chosen[r.index].kwargs)
                    ["strict"] for r in rollouts]
        follow = [float(all(v)) if p.rloo_reward == "all" else sum(v) / len(v) for v in verdicts]
        fmt = format_reward([render_prompt(chosen[r.index].prompt, modes[r.index]) for r in rollouts], texts)
        rewards = torch.tensor([f + 0.5 * g for f, g in zip(follow, fmt)])
        b = rollout_batch(rollouts, tok.pad_token_id, next(policy.parameters()).device)
        mask = b["completion_mask"].float()
        with torch.no_grad():
            ref = token_logprobs(reference, b["input_ids"], b["attention_mask"], mask.shape[1], p.temperature)
        kl = sequence_kl(b["sampling_logps"], ref, mask)
        adv = rloo_advantages(rewards.to(kl.device), p.rloo_k, kl=kl, beta=p.rloo_beta)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "mask": mask,
                "old": b["sampling_logps"], "adv": adv, "n_tokens": b["n_tokens"],
                "stats": {"follow_reward": statistics.mean(follow), "format_reward": statistics.mean(fmt),
                          "kl": float(kl.mean()), "completion_len": float(mask.sum(1).mean())}}

    def loss(model, b):
        logps = token_logprobs(model, b["input_ids"], b["attention_mask"], b["mask"].shape[1], p.temperature)
        value, stats = rloo_loss(logps, b["old"], b["adv"], b["mask"])
        return {"loss": value, **stats, **b["stats"]}

    cfg = LoopConfig(steps=p.rloo_steps, lr=p.rloo_lr, warmup=2, ckpt_every=p.ckpt_every, weight_decay=0.0)
    train_loop(policy, batch, cfg, folder, desc="rloo", progress=p.progress, loss_fn=loss,
               fingerprint=f"rloo|{fingerprint(p)}")


# ---------------------------------------------------------------------------------------------- the reward model


def labelled_pairs(p: Params, tok, engine, world, prompts, tag: str, gold: bool) -> list[Pair]:
    """Pairs of distinct answers (up to ``rm_pairs_per_prompt`` per prompt) from ``engine``'s policy, labelled by
    the annotators (``gold=False``: noisy; no preference dropped) or by the gold judge (ties dropped)."""
    modes = [mode_of(p, tag, c.key) for c in prompts]
    per = sample_answers(engine, tok, [c.prompt for c in prompts], modes, n=p.rm_samples, p=p,
                         seed=p.seed * 31 + zlib.crc32(tag.encode()))
    rng = random.Random(f"{p.seed}:annotate:{tag}")
    pairs = []
    for c, mode, rs in zip(prompts, modes, per):
        answers = list(dict.fromkeys(a for a in (answer_of(tok, r) for r in rs) if a))
        combos = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
        for i, j in rng.sample(combos, min(p.rm_pairs_per_prompt, len(combos))):
            a, b = answers[i], answers[j]
            ja, jb = chatworld.judge(world, c, a), chatworld.judge(world, c, b)
            if gold:
                pick = None if ja["score"] == jb["score"] else (0 if ja["score"] > jb["score"] else 1)
            else:
                pick = chatworld.annotate(ja, jb, rng, p.annotator_noise, p.annotator_flip)
            if pick is None:
                continue
            w, lo = (a, b) if pick == 0 else (b, a)
            pairs.append(Pair(c.prompt, w, lo, mode))
    return pairs


def train_reward_model(p: Params, policy, tok, engine, world, prompts, folder: Path) -> None:
    engine.load_weights(policy)
    pairs = labelled_pairs(p, tok, engine, world, prompts, "rm", gold=False)
    if len(pairs) < 2:
        raise RuntimeError(f"stage {p.STAGE}: only {len(pairs)} labelled pair(s) from {len(prompts)} chat prompts: "
                           "the policy's answers hardly differ; raise rm_samples or temperature")
    write_pairs(folder.parent / "pairs_reward_model.jsonl", pairs)
    backbone, _ = load_model(model_dir(p.run_dir, p.init), next(policy.parameters()).device)
    backbone.load_state_dict(policy.state_dict())
    rm = RewardModel(backbone, p.rm_objective, chatworld.ATTRIBUTES if p.rm_objective == "attributes" else (),
                     chatworld.GOLD_WEIGHTS if p.rm_objective == "attributes" else None)
    attrs = None
    if p.rm_objective == "attributes":  # the annotators' ratings of each answer (noisy), to regress
        rng = random.Random(f"{p.seed}:ratings")
        by_prompt = {c.prompt: c for c in prompts}
        attrs = [[[min(4, max(0, round(chatworld.judge(world, by_prompt[x.prompt], t)[a] +
                                       rng.gauss(0, p.annotator_noise)))) for a in chatworld.ATTRIBUTES]
                  for t in (x.chosen, x.rejected)] for x in pairs]

    def batch(step: int) -> dict:
        idx = [(step * p.rm_batch + i) % len(pairs) for i in range(p.rm_batch)]
        texts = [rm_view(pairs[i].prompt, pairs[i].chosen) for i in idx] + \
                [rm_view(pairs[i].prompt, pairs[i].rejected) for i in idx]
        ids, mask = encode(tok, texts)
        out = {"input_ids": ids, "attention_mask": mask, "n": len(idx), "n_tokens": int(mask.sum())}
        if attrs is not None:
            out["ratings"] = torch.tensor([attrs[i][0] for i in idx] + [attrs[i][1] for i in idx], dtype=torch.float)
        return out

    def loss(model, b):
        if attrs is not None:
            value = attribute_loss(model.outputs(b["input_ids"], b["attention_mask"]), b["ratings"])
            return {"loss": value}
        s = model.score(b["input_ids"], b["attention_mask"])
        value = bradley_terry_loss(s[: b["n"]], s[b["n"]:])
        return {"loss": value, "pair_accuracy": float((s[: b["n"]] > s[b["n"]:]).float().mean())}

    cfg = LoopConfig(steps=p.rm_steps, lr=p.rm_lr, warmup=5, ckpt_every=p.ckpt_every, weight_decay=0.0)
    train_loop(rm, batch, cfg, folder.parent / "reward_model_train", desc="reward model", progress=p.progress,
               loss_fn=loss, fingerprint=f"rm|{fingerprint(p)}")
    save_reward_model(rm, tok, folder)


def held_out_rm_accuracy(p: Params, rm, tok, engine, world, prompts, out: Path) -> float:
    """The reward model's pairwise accuracy on held-out chat prompts' answer pairs labelled by the gold judge."""
    pairs = cached(out / "pairs_gold_test.json",
                   lambda: [x.to_dict() for x in labelled_pairs(p, tok, engine, world, prompts, "gold", gold=True)])
    if not pairs:
        return float("nan")
    sw = score_texts(rm, tok, [rm_view(x["prompt"], x["chosen"]) for x in pairs])
    sl = score_texts(rm, tok, [rm_view(x["prompt"], x["rejected"]) for x in pairs])
    return round(statistics.mean(float(a > b) for a, b in zip(sw, sl)), 4)


# ---------------------------------------------------------------------------------------------- RPO / DPO


def round_pairs(p: Params, policy, tok, engine, rm, prompts, r: int, out: Path) -> list[Pair]:
    """One online round's pairs: the reward model's best and worst of a prompt's ``rpo_samples`` answers that
    keep the mode's format."""
    path = out / f"pairs_{r}.jsonl"
    if path.exists():
        return read_pairs(path)[0]
    engine.load_weights(policy)
    chosen = random.Random(f"{p.seed}:rpo:{r}").sample(prompts, min(p.rpo_prompts, len(prompts)))
    modes = [mode_of(p, f"rpo{r}", c.key) for c in chosen]
    per = sample_answers(engine, tok, [c.prompt for c in chosen], modes, n=p.rpo_samples, p=p, seed=p.seed * 101 + r)
    pairs = []
    for c, mode, rs in zip(chosen, modes, per):
        # only answers in the mode's format compete: the reward model reads the final answer alone and cannot
        # see a broken think block, which a pair would otherwise teach
        texts = list(dict.fromkeys(t for t in (text_of(tok, x) for x in rs) if compliant(t, mode)))
        if len(texts) < 2:
            continue
        scores = score_texts(rm, tok, [rm_view(c.prompt, t) for t in texts])
        best, worst = max(range(len(texts)), key=scores.__getitem__), min(range(len(texts)), key=scores.__getitem__)
        if scores[best] > scores[worst]:
            pairs.append(Pair(c.prompt, texts[best], texts[worst], mode, round(scores[best], 5),
                              round(scores[worst], 5)))
    if pairs:
        write_pairs(path, pairs)
    return pairs


def train_preference(p: Params, policy, tok, pairs: list[Pair], rm, kind: str, folder: Path) -> None:
    """``rpo_steps`` steps of ``kind`` (rpo or dpo) on ``pairs``, the reference being the policy as it starts."""
    device = next(policy.parameters()).device
    if kind == "rpo" and any(x.chosen_score is None for x in pairs):  # an offline file without scores
        for x in pairs:
            if x.chosen_score is None:
                x.chosen_score, x.rejected_score = score_texts(rm, tok, [rm_view(x.prompt, x.chosen),
                                                                         rm_view(x.prompt, x.rejected)])
    w, lo = pair_rollouts(tok, pairs)
    bw, bl = rollout_batch(w, tok.pad_token_id), rollout_batch(lo, tok.pad_token_id)
    with torch.no_grad():
        was = policy.training
        policy.eval()
        ref_w = [sum_logps(policy, bw, i, p.rpo_batch) for i in range(0, len(pairs), p.rpo_batch)]
        ref_l = [sum_logps(policy, bl, i, p.rpo_batch) for i in range(0, len(pairs), p.rpo_batch)]
        policy.train(was)
    ref_w, ref_l = torch.cat(ref_w), torch.cat(ref_l)
    gap = torch.tensor([(x.chosen_score or 0.0) - (x.rejected_score or 0.0) for x in pairs])

    def batch(step: int) -> dict:
        idx = torch.tensor([(step * p.rpo_batch + i) % len(pairs) for i in range(min(p.rpo_batch, len(pairs)))])
        return {"idx": idx, "n_tokens": int(bw["completion_mask"][idx].sum() + bl["completion_mask"][idx].sum())}

    def loss(model, b):
        i = b["idx"]
        pw = sum_rows(model, bw, i)
        pl = sum_rows(model, bl, i)
        delta = implicit_reward_gap(pw, pl, ref_w[i].to(device), ref_l[i].to(device))
        value = preference_loss(kind, delta, gap[i].to(device), beta=p.beta, eta=p.eta, distance=p.rpo_distance).mean()
        return {"loss": value, "margin": float(delta.detach().mean()),
                "pair_accuracy": float((delta.detach() > 0).float().mean())}

    cfg = LoopConfig(steps=p.rpo_steps, lr=p.rpo_lr, warmup=2, ckpt_every=p.ckpt_every, weight_decay=0.0)
    train_loop(policy, batch, cfg, folder, desc=kind, progress=p.progress, loss_fn=loss,
               fingerprint=f"{kind}|{folder.name}|{fingerprint(p)}")


def sum_rows(model, b: dict, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a pair batch: each answer's summed log-probability under ``model``."""
    device = next(model.parameters()).device
    return sequence_logps(model, b["input_ids"][idx].to(device), b["attention_mask"][idx].to(device),
                          b["completion_mask"][idx].to(device).float())


def sum_logps(model, b: dict, start: int, size: int) -> torch.Tensor:
    return sum_rows(model, b, torch.arange(start, min(start + size, b["input_ids"].shape[0]))).cpu()


# ---------------------------------------------------------------------------------------------- metrics


def summarize_run(p: Params, ctx: Context, start_rows, final_rows, rm_accuracy, dpo) -> dict:
    phases = ctx.read_phases()
    by = {(r["phase"], r["mode"]): r for r in phases}
    policy_phases = [r["phase"] for r in phases if r["mode"] == "on" and not r["phase"].startswith("dpo")]
    last = policy_phases[-1]  # the aligned policy's last phase (a round with no pair records none)
    after_rloo = "rloo" if "rloo" in policy_phases else "start"
    dom0 = {(s["mode"], s["domain"]): s for s in summarize(start_rows, by=("mode", "domain"))}
    dom1 = {(s["mode"], s["domain"]): s for s in summarize(final_rows, by=("mode", "domain"))}
    change = {f"{m}/{d}": round(dom1[(m, d)]["accuracy"] - dom0[(m, d)]["accuracy"], 4) for (m, d) in dom1
              if d != "all" and (m, d) in dom0}
    f = "prompt_level_strict_acc"
    return {
        "ifeval": {m: {"start": float(by[("start", m)][f]), "after_rloo": float(by[(after_rloo, m)][f]),
                       "final": float(by[(last, m)][f])} for m in ("on", "off")},
        "ifeval_final": {m: {k: float(v) for k, v in by[(last, m)].items() if "_acc" in k} for m in ("on", "off")},
        "win_rate": {m: float(by[(last, m)]["win_rate_gold"]) for m in ("on", "off")},
        "win_interval": {m: [float(by[(last, m)]["win_low"]), float(by[(last, m)]["win_high"])] for m in ("on", "off")},
        "win_rate_rm": {m: float(by[(last, m)]["win_rate_rm"]) if by[(last, m)]["win_rate_rm"] != "" else None
                        for m in ("on", "off")},
        "dpo_win_rate": {m: float(dpo[m]["win_rate_gold"]) for m in ("on", "off")} if dpo else None,
        "rm_accuracy": rm_accuracy,
        "accuracy_change": change,
        "worst_domain_change": min(change.values()) if change else 0.0,
        "compliance": {m: dom1[(m, "all")]["compliance"] for m in ("on", "off")},
        "leakage_off": dom1[("off", "all")]["leakage"],
        "phases": [r["phase"] for r in phases if r["mode"] == "on"],
    }
