"""A run file's ``sweep:`` section: one run file, many named runs, one table of their headline figures.

::

    run: lr-sweep
    run_dir: ../runs/lr-sweep        # each point's run goes to <run_dir>/<point>/
    stages: {00_parent: {}, ...}
    sweep:
      grid:                          # every combination (or `list:` of mappings, one per point)
        seed: [0, 1]                 # a shared parameter: every stage that has it
        00_parent.lr: [1e-3, 3e-3]   # one stage's parameter

``python -m lnkit.runs <file>`` expands it (:func:`points`) into runs named ``<run>-<point>`` in
``<run_dir>/<point>/``, each a plain run file of its own (:func:`point_spec`, paths made absolute, kept as
``<run_dir>/<point>.yaml``), runs them one after the other exactly as any run (completed stages skipped), and
collates every point's metrics (:func:`collate`) into ``<run_dir>/sweep.csv`` (one row per point: the swept
values, then every stage's scalar metrics as ``<stage>.<name>``) and ``<run_dir>/sweep.png``.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

from lnkit.io import atomic_path

SWEEP_KEYS = {"grid", "list"}


class SweepSpecError(ValueError):
    """A ``sweep:`` section is malformed."""


def points(sweep: dict, where: str = "sweep") -> list[dict]:
    """The sweep's points, each ``{key: value}`` (``key``: ``param`` or ``stage.param``).

    >>> points({"grid": {"seed": [0, 1], "00_parent.lr": [0.1]}})
    [{'seed': 0, '00_parent.lr': 0.1}, {'seed': 1, '00_parent.lr': 0.1}]
    >>> points({"list": [{"seed": 3}, {"seed": 4, "steps": 9}]})
    [{'seed': 3}, {'seed': 4, 'steps': 9}]
    """
    if not isinstance(sweep, dict) or len(set(sweep) & SWEEP_KEYS) != 1 or set(sweep) - SWEEP_KEYS:
        raise SweepSpecError(f"{where}: expected exactly one of {sorted(SWEEP_KEYS)}, got {sweep!r}")
    if "grid" in sweep:
        grid = sweep["grid"]
        if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise SweepSpecError(f"{where}.grid: expected a mapping of parameter -> non-empty list of values")
        keys = list(grid)
        out = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    else:
        out = sweep["list"]
        if not isinstance(out, list) or not out or any(not isinstance(x, dict) or not x for x in out):
            raise SweepSpecError(f"{where}.list: expected a non-empty list of non-empty mappings")
    for pt in out:
        for key in pt:
            if not isinstance(key, str) or not all(part.isidentifier() or re.fullmatch(r"\d\d_\w+", part)
                                                   for part in key.split(".", 1)):
                raise SweepSpecError(f"{where}: {key!r} is neither a parameter nor stage.parameter")
    names = [point_name(pt) for pt in out]
    if len(set(names)) != len(names):
        raise SweepSpecError(f"{where}: two points are the same: {names}")
    return out


def point_name(pt: dict) -> str:
    """A folder-safe name for a point.

    >>> point_name({"seed": 1, "00_parent.lr": 0.003})
    'seed1_00_parent.lr0.003'
    """
    return "_".join(re.sub(r"[^A-Za-z0-9._\-]+", "-", f"{k}{v}") for k, v in pt.items())


def point_spec(spec: dict, pt: dict, resolved: dict) -> dict:
    """A plain run file (no sweep) for one point: ``resolved`` is the spec with every path absolute; the
    point's values go to ``shared`` (plain keys) or to their stage (``stage.param``)."""
    name = point_name(pt)
    out = {"run": f"{spec['run']}-{name}", "run_dir": str(Path(resolved["run_dir"]) / name),
           "shared": dict(resolved.get("shared") or {}),
           "stages": {s: dict(v or {}) for s, v in resolved["stages"].items()}}
    if spec.get("slurm"):
        out["slurm"] = spec["slurm"]  # each point's jobs ask for the same resources
    for key, value in pt.items():
        if "." in key:
            stage, param = key.split(".", 1)
            if stage not in out["stages"]:
                raise SweepSpecError(f"sweep: {key!r} names stage {stage}, which is not in the run's stages")
            out["stages"][stage][param] = value
        else:
            out["shared"][key] = value
    return out


def scalars(metrics: dict, prefix: str) -> dict:
    """The numeric scalars of a stage's metrics, one level of nesting flattened (``a.b``)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}.{k}"] = v
        elif isinstance(v, dict):
            out.update({f"{prefix}.{k}.{k2}": v2 for k2, v2 in v.items()
                        if isinstance(v2, (int, float)) and not isinstance(v2, bool)})
    return out


def collate(run_dir: Path, pts: list[dict], stages: list[str]) -> list[dict]:
    """One row per point: its name, its values, every completed stage's scalar metrics; written to
    ``<run_dir>/sweep.csv``."""
    rows = []
    for pt in pts:
        name = point_name(pt)
        row = {"point": name, **pt}
        for stage in stages:
            m = run_dir / name / stage / "metrics.json"
            if m.is_file():
                row.update(scalars(json.loads(m.read_text()), stage))
        rows.append(row)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(run_dir / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    return rows


def figure(rows: list[dict], metrics: list[str], path: Path) -> None:
    """A panel per metric (up to four): its value at each point."""
    import matplotlib.pyplot as plt

    from lnkit.plots import save

    metrics = [m for m in metrics if any(m in r for r in rows)][:4]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.bar(range(len(rows)), [float(r.get(m, "nan")) for r in rows])
        ax.set_xticks(range(len(rows)), [r["point"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
