"""Stage parameters: documented dataclasses that validate before any compute starts.

Each stage declares its parameters as a dataclass whose fields match its notebook's ``parameters`` cell
one to one. Fields are declared with :func:`param`, which records a help text and the allowed values
(a numeric range or a list of choices). Construction checks types and values and fails with the stage,
the field and what is allowed, so a typo in a run file stops the run before anything is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import MISSING, dataclass, field, fields


class ParamError(ValueError):
    """A run parameter is unknown, mistyped or out of range."""


def param(default, help: str, *, lo=None, hi=None, choices=None, min_items=None):
    """A documented dataclass field with its allowed values (``min_items``: the fewest a list may hold)."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "min_items": min_items}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices") is not None:
        return f"one of {list(m['choices'])}"
    parts = [f"at least {m['min_items']} item(s)"] if m.get("min_items") else []
    if m.get("lo") is not None:
        parts.append(f">= {m['lo']}")
    if m.get("hi") is not None:
        parts.append(f"<= {m['hi']}")
    return " and ".join(parts) or "any value of its type"


def _check_type(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_check_type(v, arg) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp) or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(_check_type(a, k) and _check_type(b, v) for a, b in value.items())
    return isinstance(value, tp)


def _name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _type_problem(value, tp) -> str:
    """What is wrong with ``value``'s type, down to the first bad element of a list or mapping.

    >>> _type_problem([0.5, "a"], list[float])
    "holds 'a' (item 1) of type str, expected float"
    >>> _type_problem("ten", int)
    'has type str, expected int'
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        for i, x in enumerate(value):
            if not _check_type(x, args[0]):
                return f"holds {x!r} (item {i}) of type {type(x).__name__}, expected {_name(args[0])}"
    if origin is dict and isinstance(value, dict) and args:
        for k, x in value.items():
            if not _check_type(k, args[0]):
                return f"has the key {k!r} of type {type(k).__name__}, expected {_name(args[0])}"
            if not _check_type(x, args[1]):
                return f"maps {k!r} to {x!r} of type {type(x).__name__}, expected {_name(args[1])}"
    return f"has type {type(value).__name__}, expected {_name(tp)}"


@dataclass
class StageParams:
    """Base of every stage's parameters. ``STAGE`` names the stage in error messages."""

    STAGE: typing.ClassVar[str] = "?"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            if not _check_type(v, hints[f.name]):
                raise ParamError(f"stage {self.STAGE}: parameter {f.name}={v!r} {_type_problem(v, hints[f.name])} "
                                 f"({_allowed(f)})")
            m = f.metadata
            vals = list(v.values()) if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            if m.get("min_items") and len(vals) < m["min_items"]:
                raise ParamError(f"stage {self.STAGE}: parameter {f.name}={v!r} is empty; allowed: {_allowed(f)}")
            for x in vals:
                if isinstance(x, float) and not math.isfinite(x):
                    raise ParamError(f"stage {self.STAGE}: parameter {f.name}={v!r} is not a finite number; "
                                     f"allowed: {_allowed(f)}")
                bad = (m.get("choices") is not None and x not in m["choices"]) or (
                    isinstance(x, (int, float))
                    and ((m.get("lo") is not None and x < m["lo"]) or (m.get("hi") is not None and x > m["hi"]))
                )
                if bad:
                    raise ParamError(f"stage {self.STAGE}: parameter {f.name}={v!r} is out of range; allowed: {_allowed(f)}")
        self.check()

    def check(self) -> None:
        """Cross-field checks; override in a stage. Raise :class:`ParamError`."""

    @classmethod
    def from_dict(cls, values: dict) -> StageParams:
        """Build from a mapping; unknown keys are errors that list the known ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ParamError(
                f"stage {cls.STAGE}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(names)}"
            )
        return cls(**values)

    @classmethod
    def from_namespace(cls, ns: dict) -> StageParams:
        """Pick this stage's fields out of a notebook's globals (its parameters cell)."""
        missing = [f.name for f in fields(cls) if f.name not in ns and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise ParamError(f"stage {cls.STAGE}: parameters cell lacks {', '.join(missing)}")
        return cls(**{f.name: ns[f.name] for f in fields(cls) if f.name in ns})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of the values that affect results (used by the run's completion markers)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, default, allowed values, help."""
        lines = []
        for f in fields(cls):
            d = f.default if f.default is not MISSING else f.default_factory()
            lines.append(f"{f.name} = {d!r}  # {f.metadata.get('help', '')} ({_allowed(f)})")
        return "\n".join(lines)


@dataclass
class RunParams(StageParams):
    """The fields every pipeline stage shares: where its artifacts and figures go, the seed, the device
    and CPU threads, progress bars. A stage declares only its own fields on top (and may override a
    default, as the Puzzle stages do for ``threads``)."""

    run_dir: str = param("runs/tiny", "folder holding every stage's artifacts")
    figures_dir: str = param("", "a second home for the pipeline's figures (the tiny run: the README's figures/); "
                             "'' keeps them in the stage folder only")
    seed: int = param(0, "seed for data order, initialisation and sampling", lo=0)
    device: str = param("cpu", "where to compute", choices=["cpu", "cuda", "auto"])
    threads: int = param(0, "torch CPU threads; 0 keeps torch's default", lo=0, hi=256)
    progress: bool = param(True, "show progress bars")

    def setup_torch(self) -> str:
        """Apply ``threads`` and return the device to use ('auto' resolved)."""
        import torch  # here, not at the top: the deployment planner's parameters need no torch (2 s to import)

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ParamError(f"stage {self.STAGE}: device='cuda' but CUDA is not available; use 'cpu' or 'auto'")
        return self.device
