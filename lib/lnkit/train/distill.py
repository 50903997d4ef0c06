"""Global knowledge distillation losses (paper Section 2.2): a Puzzle child (the student) learns to
reproduce the parent (the teacher) over the whole model, not block by block.

The loss is the Puzzle paper's best combination: forward KL from the teacher's next-token distribution
to the student's (``KL(teacher || student)`` at a temperature, scaled by T^2 so gradients keep their
size) plus the cosine distance between the two models' final hidden states (after the final norm), with
an optional LM-loss term on the labels (off by default, as in the paper). ``cpt`` is continued
pretraining instead: the plain LM loss, no teacher. ``kd_cpt`` is LN-Ultra's recipe, distillation then
continued pretraining: a batch carrying ``distill=False`` gets the LM loss alone (the stage marks the
batches of the final CPT share of the steps that way).

Positions: ``"all"`` averages over every real token (padding of packed rows excluded), ``"labels"``
over the positions whose next token is a label (assistant answers and documents; prompts excluded).
Each function is pure; :func:`make_loss_fn` wraps them into the ``loss_fn(model, batch)`` the shared
training loop takes.

Across processes (``torchrun``, :mod:`lnkit.train.distributed`) the student is sharded by the loop and the
teacher is replicated: every process holds all of it and runs it, without gradients, on its own rows, with
no communication. The loss function's ``loss_tokens`` tells the loop how many positions each process's
loss averages over, so that the processes' losses weigh what they weigh in one process. The logged
columns are weighted the same way: exact for ``kl`` and ``cosine``, while ``lm`` on KD batches with
``kd_positions="all"`` is then close to, not equal to, one process's (its positions are the labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lnkit.train.batches import IGNORE

POSITIONS = ("all", "labels")
MODES = ("kd", "cpt", "kd_cpt")


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` (logits: rows x vocab).

    >>> t = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(forward_kl(t, t)), round(float(forward_kl(torch.zeros(1, 3), t)), 4)
    (0.0, 0.5743)
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def cosine_distance(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``1 - cos(student, teacher)`` (hidden states: rows x hidden).

    >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> float(cosine_distance(h, h)), float(cosine_distance(h, -h)), float(cosine_distance(h, h.flip(0)))
    (0.0, 2.0, 1.0)
    """
    return (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


def position_mask(batch: dict, kd_positions: str, pad_id: int) -> torch.Tensor:
    """Boolean (batch x seq) mask of the positions the distillation loss averages over.

    ``"all"``: every real token (the input is not padding). ``"labels"``: positions whose *next* token
    has a label, i.e. where the model's prediction is trained by the LM loss too.

    >>> b = {"input_ids": torch.tensor([[5, 6, 7, 0]]), "labels": torch.tensor([[-100, -100, 7, -100]])}
    >>> position_mask(b, "all", pad_id=0).tolist(), position_mask(b, "labels", pad_id=0).tolist()
    ([[True, True, True, False]], [[False, True, False, False]])
    """
    if kd_positions not in POSITIONS:
        raise ValueError(f"kd_positions={kd_positions!r}; allowed: {list(POSITIONS)}")
    ids = batch["input_ids"]
    if kd_positions == "all":
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            return mask.bool()
        return ids != pad_id
    labels = batch["labels"]
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE
    return out


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions (the causal-LM loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def check_pair(student, teacher, student_name: str = "student", teacher_name: str = "teacher") -> None:
    """Distillation needs the same vocabulary (logits compared token by token) and hidden size (cosine).

    Raises ``ValueError`` naming both models and both sizes."""
    for field, what in (("vocab_size", "vocabulary"), ("hidden_size", "hidden size")):
        a, b = getattr(student.config, field), getattr(teacher.config, field)
        if a != b:
            raise ValueError(f"cannot distill {teacher_name} into {student_name}: the student's {what} is {a}, "
                             f"the teacher's {b}; they must be equal")


def make_loss_fn(teacher=None, *, mode: str = "kd", temperature: float = 1.0, kd_positions: str = "all",
                 kl_weight: float = 1.0, cosine_weight: float = 1.0, lm_weight: float = 0.0, pad_id: int = 0):
    """``loss_fn(student, batch) -> {"loss": tensor, "kl": ..., "cosine": ..., "lm": ...}`` for the loop.

    ``mode="kd"``: ``kl_weight * KL + cosine_weight * cosine + lm_weight * LM`` against ``teacher``
    (run without gradients). ``mode="cpt"``: the LM loss alone; ``teacher`` is not used. ``mode="kd_cpt"``:
    as ``kd``, except on batches with ``distill`` false, which get the LM loss alone (no teacher forward).
    The LM loss is logged in every mode (it is cheap once the logits exist). ``loss_fn.loss_tokens(batch)``
    counts the positions the loss averages over (the training loop weighs processes by it).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
    if mode != "cpt" and teacher is None:
        raise ValueError(f"mode={mode!r} needs a teacher")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")

    def loss_fn(student, batch: dict) -> dict:
        labels = batch["labels"]
        distill = mode != "cpt" and bool(batch.get("distill", True))
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "distill")}
        want_hidden = distill and cosine_weight > 0
        out = student(**inputs, output_hidden_states=want_hidden)
        lm = lm_loss(out.logits, labels)
        if not distill:
            return {"loss": lm, "lm": lm.item()}
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=want_hidden)
        mask = position_mask(batch, kd_positions, pad_id)
        kl = forward_kl(out.logits[mask], t_out.logits[mask], temperature)
        loss = kl_weight * kl
        logged = {"kl": kl.item(), "lm": lm.item()}
        if want_hidden:
            cos = cosine_distance(out.hidden_states[-1][mask], t_out.hidden_states[-1][mask])
            loss = loss + cosine_weight * cos
            logged["cosine"] = cos.item()
        if lm_weight > 0:
            loss = loss + lm_weight * lm
        return {"loss": loss, **logged}

    def loss_tokens(batch: dict) -> int:
        if mode == "cpt" or not bool(batch.get("distill", True)):
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        if lm_weight > 0 and kd_positions == "all":
            raise ValueError(f"lm_weight={lm_weight} with kd_positions='all' adds means over different positions "
                             "(KD: every real token; LM: the labels), which one count per process cannot weigh "
                             "across processes; set kd_positions='labels' or lm_weight=0, or train in one process")
        return int(position_mask(batch, kd_positions, pad_id).sum())

    loss_fn.loss_tokens = loss_tokens
    return loss_fn
