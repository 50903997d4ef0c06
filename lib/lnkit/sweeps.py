"""Parameter sweeps over one stage: several variants of a stage, each in a run folder of its own that reads a
base run's completed stages, executed through the same notebooks and runner as any run, then one figure.

    python -m lnkit.sweeps papermill_runs/grpo_sweep.yaml

A sweep file::

    sweep: grpo_curriculum_vs_random   # the sweep's name (papermill output: papermill_runs/output/<name>-<variant>/)
    base_run_dir: ../runs/tiny         # the run whose completed stages the variants read
    link: [00_parent, 06_reasoning_sft]  # those stages, linked (read, never written) into each variant's folder
    run_dir: ../runs/grpo_sweep        # one folder per variant below it
    stage: 07_grpo                     # the stage every variant runs
    shared: {steps: 40}                # parameters of every variant
    variants:                          # name -> its own parameters
      curriculum-seed0: {order: curriculum, seed: 0}
    figure: grpo_curriculum_vs_random  # a sweep figure of lnkit.plots.SWEEP_FIGURES
    figures_dir: ../figures            # optional second home for the figure

Paths are relative to the sweep file's folder. A variant already complete with its parameters is skipped,
as the runner skips stages; ``--force`` reruns them. Each variant's folder gets a ``run.yaml`` of its own
(one stage), so any notebook can be pointed at it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lnkit import plots, runs
from lnkit.checkpoints import MARKER
from lnkit.io import atomic_write_text


class SweepError(ValueError):
    """A sweep file that cannot be run, named with the field at fault."""


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SweepError(f"sweep file {path}: cannot read it: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep file {path}: expected a mapping at the top")
    for key, kind in (("sweep", str), ("base_run_dir", str), ("link", list), ("run_dir", str), ("stage", str),
                      ("variants", dict)):
        if not isinstance(spec.get(key), kind):
            raise SweepError(f"sweep file {path}: field {key!r} must be a {kind.__name__}, got {spec.get(key)!r}")
    if spec["stage"] not in runs.STAGES:
        raise SweepError(f"sweep file {path}: stage {spec['stage']!r} is not a stage ({', '.join(runs.STAGES)})")
    if not spec["variants"] or any(not isinstance(v, dict) for v in spec["variants"].values()):
        raise SweepError(f"sweep file {path}: variants must map names to parameter mappings")
    if spec.get("figure") and spec["figure"] not in plots.SWEEP_FIGURES:
        raise SweepError(f"sweep file {path}: figure {spec['figure']!r} is not one of {sorted(plots.SWEEP_FIGURES)}")
    base = path.resolve().parent
    for key in ("base_run_dir", "run_dir", "figures_dir"):
        if spec.get(key):
            spec[key] = str((base / spec[key]).resolve()) if not Path(spec[key]).is_absolute() else spec[key]
    missing = [s for s in spec["link"] if not (Path(spec["base_run_dir"]) / s / MARKER).is_file()]
    if missing:
        raise SweepError(f"sweep file {path}: the base run {spec['base_run_dir']} has not completed {missing}; "
                         "run it first (make reproduce, or python -m lnkit.runs papermill_runs/tiny.yaml)")
    return spec


def prepare_variant(spec: dict, name: str) -> Path:
    """The variant's folder with the base stages linked in and a one-stage run file; returns the run file."""
    folder = Path(spec["run_dir"]) / name
    folder.mkdir(parents=True, exist_ok=True)
    for s in spec["link"]:
        link, target = folder / s, Path(spec["base_run_dir"]) / s
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise SweepError(f"{link} exists and is not a link to {target}; remove it or use another run_dir")
        link.symlink_to(target, target_is_directory=True)
    params = {**(spec.get("shared") or {}), **spec["variants"][name]}
    run_file = folder / "sweep_run.yaml"
    atomic_write_text(run_file, f"# variant {name} of sweep {spec['sweep']}, written by python -m lnkit.sweeps\n"
                      + yaml.safe_dump({"run": f"{spec['sweep']}-{name}", "run_dir": ".",
                                        "stages": {spec["stage"]: params}}, sort_keys=False))
    return run_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lnkit.sweeps", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_file")
    ap.add_argument("--force", action="store_true", help="rerun variants that are complete")
    ap.add_argument("--only", metavar="VARIANT", help="run one variant")
    a = ap.parse_args(argv)
    try:
        spec = read_sweep(a.sweep_file)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = [a.only] if a.only else list(spec["variants"])
    for name in names:
        if name not in spec["variants"]:
            print(f"error: no variant {name!r}; the sweep has {', '.join(spec['variants'])}", file=sys.stderr)
            return 1
        print(f"=== sweep {spec['sweep']}: variant {name}")
        rc = runs.main([str(prepare_variant(spec, name)), *(["--force"] if a.force else [])])
        if rc:
            return rc
    if spec.get("figure"):
        folders = {n: Path(spec["run_dir"]) / n for n in spec["variants"]}
        done = {n: f for n, f in folders.items() if (f / spec["stage"] / MARKER).is_file()}
        fig = plots.SWEEP_FIGURES[spec["figure"]](done, {n: spec["variants"][n] for n in done})
        out = [Path(spec["run_dir"]) / f"{spec['figure']}.png"]
        if spec.get("figures_dir"):
            out.append(Path(spec["figures_dir"]) / f"{spec['figure']}.png")
        plots.save(fig, *out)
        print(f"figure: {', '.join(map(str, out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
