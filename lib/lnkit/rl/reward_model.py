"""A reward model: the policy's architecture with a scalar head (paper Section 6.2's reward model, in small).

The decoder of a causal LM (any lnkit or transformers Llama checkpoint) reads a whole conversation, prompt
and answer; a linear head on the hidden state of its last token gives the score. Two objectives:

- ``bradley_terry``: one output; pairs (chosen, rejected) trained with ``-log sigmoid(s_w - s_l)``;
- ``attributes``: one output per HelpSteer2 attribute, regressed on the annotators' 0-4 ratings (mean squared
  error); the score is their weighted sum with the rating guideline's weights (``weights``).

Saved as a folder: the backbone as a Hugging Face checkpoint in ``backbone/`` (its tokenizer beside it),
the head in ``head.safetensors`` and the settings in ``reward.json``, written atomically together.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lnkit.checkpoints import load_model
from lnkit.data.chat import EOT, render_prompt
from lnkit.io import CheckpointError, atomic_dir

OBJECTIVES = ("bradley_terry", "attributes")


class RewardModel(nn.Module):
    """``backbone``: a causal LM whose decoder (``.model``) is reused; ``outputs``: 1 (Bradley-Terry) or one
    per attribute. ``weights`` turns attribute outputs into one score."""

    def __init__(self, backbone, objective: str = "bradley_terry", attributes: tuple[str, ...] = (),
                 weights: dict[str, float] | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"reward objective {objective!r}: expected one of {OBJECTIVES}")
        if objective == "attributes" and (not attributes or not weights or set(weights) != set(attributes)):
            raise ValueError("objective 'attributes' needs the attribute names and a weight for each")
        self.objective, self.attributes, self.weights = objective, tuple(attributes), dict(weights or {})
        self.lm = backbone
        self.head = nn.Linear(backbone.config.hidden_size, len(self.attributes) if objective == "attributes" else 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.lm.config

    def outputs(self, input_ids, attention_mask) -> torch.Tensor:
        """(rows, outputs): the head on each row's last real token (rows right-padded)."""
        out = self.lm.model(input_ids=input_ids, attention_mask=attention_mask)
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state  # nemotron-nas returns a tuple
        last = attention_mask.long().sum(1) - 1
        return self.head(h[torch.arange(h.shape[0], device=h.device), last].float())

    def score(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.outputs(input_ids, attention_mask)
        if self.objective == "bradley_terry":
            return out[:, 0]
        w = torch.tensor([self.weights[a] for a in self.attributes], device=out.device, dtype=out.dtype)
        return out @ w


def bradley_terry_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(score_chosen - score_rejected).mean()


def attribute_loss(predicted: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(predicted, ratings)


def conversation(prompt: str, response: str, mode: str | None) -> str:
    """What the reward model reads: the rendered prompt, the answer and its end-of-turn token."""
    return render_prompt(prompt, mode) + response + EOT


def encode(tok, texts: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of whole conversations (already rendered, special tokens in the text)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    out = torch.full((len(ids), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return out.to(device), mask.to(device)


@torch.no_grad()
def score_texts(rm: RewardModel, tok, texts: list[str], batch_size: int = 64) -> list[float]:
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode(tok, texts[i : i + batch_size], device)
        out += rm.score(ids, mask).tolist()
    rm.train(was)
    return out


def save_reward_model(rm: RewardModel, tok, path: str | Path) -> None:
    with atomic_dir(path) as tmp:
        rm.lm.save_pretrained(tmp / "backbone")
        tok.save_pretrained(tmp / "backbone")
        save_file({k: v.detach().contiguous() for k, v in rm.head.state_dict().items()}, tmp / "head.safetensors")
        (tmp / "reward.json").write_text(json.dumps({"objective": rm.objective, "attributes": list(rm.attributes),
                                                     "weights": rm.weights}, indent=1))


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[RewardModel, object]:
    """A folder written by :func:`save_reward_model`; a missing or partial one is a CheckpointError naming it."""
    path = Path(path)
    if not (path / "reward.json").is_file() or not (path / "head.safetensors").is_file():
        raise CheckpointError(f"{path} is not a reward model folder (no reward.json / head.safetensors); "
                              "train one first (stage 08 writes it)")
    spec = json.loads((path / "reward.json").read_text())
    lm, tok = load_model(path / "backbone", device)
    rm = RewardModel(lm, spec["objective"], tuple(spec["attributes"]), spec["weights"]).to(device)
    rm.head.load_state_dict(load_file(path / "head.safetensors", device=device))
    rm.eval()
    return rm, tok


def check_vocabulary(rm_tok, policy_tok, name: str) -> None:
    """A reward model reads the policy's tokens as text: another vocabulary is refused, naming the model."""
    if rm_tok.get_vocab() != policy_tok.get_vocab():
        raise ValueError(f"reward model {name} has another vocabulary than the policy ({len(rm_tok)} vs "
                         f"{len(policy_tok)} tokens); train it from the policy's own checkpoint")
