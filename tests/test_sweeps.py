"""Sweep files (lnkit.sweeps): errors name the field, variants get linked folders and a one-stage run file,
and the Figure 6 analog is drawn from the variants' files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lnkit import plots, sweeps
from lnkit.checkpoints import MARKER

ROOT = Path(__file__).resolve().parents[1]


def base_run(tmp_path) -> Path:
    base = tmp_path / "base"
    for s in ("00_parent", "06_reasoning_sft"):
        (base / s).mkdir(parents=True)
        (base / s / MARKER).write_text("{}")
    return base


def sweep_file(tmp_path, **changes) -> Path:
    spec = {"sweep": "s", "base_run_dir": "base", "link": ["00_parent", "06_reasoning_sft"], "run_dir": "out",
            "stage": "07_grpo", "shared": {"steps": 4}, "variants": {"a": {"order": "random", "seed": 1}},
            "figure": "grpo_curriculum_vs_random"}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_shipped_sweep_file_is_well_formed():
    spec = yaml.safe_load((ROOT / "papermill_runs" / "grpo_sweep.yaml").read_text())
    orders = [v["order"] for v in spec["variants"].values()]
    assert orders.count("curriculum") == orders.count("random") == 3 and spec["stage"] == "07_grpo"
    from lnkit.stages import grpo

    for v in spec["variants"].values():  # every variant's parameters are valid stage-07 parameters
        grpo.Params(**{**spec["shared"], **v})


@pytest.mark.parametrize("changes, match", [
    ({"stage": "99_nothing"}, "stage '99_nothing' is not a stage"),
    ({"variants": {}}, "variants"),
    ({"link": "00_parent"}, "field 'link' must be a list"),
    ({"figure": "nope"}, "figure 'nope'"),
    ({"link": ["00_parent", "05_reasoning_data"]}, r"has not completed \['05_reasoning_data'\]"),
])
def test_bad_sweep_files_name_the_field(tmp_path, changes, match):
    base_run(tmp_path)
    with pytest.raises(sweeps.SweepError, match=match):
        sweeps.read_sweep(sweep_file(tmp_path, **changes))


def test_a_variant_links_the_base_stages_and_gets_its_own_run_file(tmp_path):
    base = base_run(tmp_path)
    spec = sweeps.read_sweep(sweep_file(tmp_path))
    run_file = sweeps.prepare_variant(spec, "a")
    folder = run_file.parent
    assert (folder / "00_parent").is_symlink() and (folder / "00_parent").resolve() == (base / "00_parent").resolve()
    written = yaml.safe_load(run_file.read_text())
    assert written["stages"] == {"07_grpo": {"steps": 4, "order": "random", "seed": 1}} and written["run_dir"] == "."
    assert sweeps.prepare_variant(spec, "a") == run_file  # idempotent
    (folder / "06_reasoning_sft").unlink()
    (folder / "06_reasoning_sft").mkdir()
    with pytest.raises(sweeps.SweepError, match="is not a link"):
        sweeps.prepare_variant(spec, "a")


def fake_variant(folder: Path, seed: int, gain: float):
    d = folder / "07_grpo"
    d.mkdir(parents=True)
    with open(d / "eval_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "mode", "domain", "accuracy"])
        w.writeheader()
        w.writerows({"step": s, "mode": "on", "domain": "target", "accuracy": 0.2 + gain * s + 0.01 * seed}
                    for s in (0, 4, 8))
    with open(d / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "reward_mean"])
        w.writeheader()
        w.writerows({"step": s, "reward_mean": 0.5 + gain * s} for s in range(8))
    (d / "metrics.json").write_text(json.dumps({"target": {"start": 0.2, "final": 0.2 + 8 * gain}}))


def test_the_figure_6_analog_groups_seeds_by_order(tmp_path):
    folders, params = {}, {}
    for order, gain in (("curriculum", 0.02), ("random", 0.01)):
        for seed in range(3):
            name = f"{order}-{seed}"
            folders[name] = tmp_path / name
            params[name] = {"order": order, "seed": seed}
            fake_variant(folders[name], seed, gain)
    fig = plots.grpo_curriculum_vs_random(folders, params)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"curriculum (3 seeds)", "random (3 seeds)"}
    assert lines["curriculum (3 seeds)"].get_ydata()[-1] == pytest.approx(0.2 + 0.16 + 0.01)  # mean over seeds
