"""The notebooks with widgets, run through JupyterLab in a real browser (Debian's chromium driven by
Playwright): open the notebook, Run > Run All Cells, wait for the kernel, then no error output in any
cell, every widget rendered (none failed, none still loading), and moving a control changes the text
the widget shows. The deployment planner runs as committed; stage 02's budget explorer runs on a smoke
run of stages 00-02 built here. Screenshots land in papermill_runs/output/ui/ (git-ignored).
About 2 minutes on a 2-core CPU (the smoke stages, about 40 s, run while the planner is tested).
Marked ``ui``: ``make test-ui`` runs it (``.ci/run`` does, after ``make test``, which leaves it out to stay
within its 10 minutes); skipped where /usr/bin/chromium is absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import yaml

import lab_helpers as lab_ui
from lnkit import runs

pytestmark = [pytest.mark.ui,
              pytest.mark.skipif(not lab_ui.CHROMIUM.exists(),
                                 reason=f"needs Debian's chromium at {lab_ui.CHROMIUM} (apt-get install chromium); "
                                        ".ci/run installs it")]

SHOTS = runs.OUTPUT / "ui"
SMOKE_STAGES = ["00_parent", "01_block_library", "02_architecture_search"]


@pytest.fixture(scope="module")
def smoke_started(tmp_path_factory):
    """papermill_runs/smoke.yaml's first three stages, started into a temporary folder (about 40 s).

    `python -m lnkit.runs` in a process of its own, not `runs.main` here: inside Playwright's sync API this
    thread has a running event loop, so papermill's kernel client moves to a helper thread; twice here a
    papermill run then hung (in stage 02's widget cell, and in a later papermill test of the same session).
    Its own process also lets it run in the background."""
    tmp = tmp_path_factory.mktemp("smoke_ui")
    spec = yaml.safe_load(open(runs.REPO / "papermill_runs" / "smoke.yaml"))
    spec["run"] = f"test-ui-{tmp.name}"
    spec["run_dir"] = str(tmp / "run")
    spec["stages"] = {s: spec["stages"][s] for s in SMOKE_STAGES}
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    with open(tmp / "runner.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lnkit.runs", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        yield path, proc, log
        if proc.poll() is None:  # the test that waits for it failed first: stop the runner and its kernel
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(runs.OUTPUT / spec["run"], ignore_errors=True)


@pytest.fixture(scope="module")
def smoke_run(smoke_started):
    """The run file of the finished smoke run."""
    path, proc, log = smoke_started
    rc = proc.wait(timeout=600)
    log.seek(0)
    assert rc == 0, f"the smoke run failed:\n{log.read()[-5000:]}"
    return path


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    if any("smoke_run" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("smoke_started")  # in the background while the planner's test runs
    tmp = tmp_path_factory.mktemp("lab")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with lab_ui.lab_server(tmp / "root", tmp / "state", SHOTS / "jupyterlab.log") as server:
        yield server


@pytest.fixture(scope="module")
def browser(lab):
    with lab_ui.chromium() as b:
        yield b


def prepare(notebook, run_file, dest):
    """``notebook`` pointed at the run in ``run_file``, written to ``dest`` (what JupyterLab opens): the one
    place the UI tests parameterise a stage notebook. As `papermill <notebook> <dest> -p run <run file>
    --prepare-only`: the notebook's `run` parameter names the run file, from which it reads its run folder
    and the stage's parameters, as `python -m lnkit.runs` gives them."""
    import papermill

    papermill.execute_notebook(str(notebook), str(dest), parameters={"run": str(run_file)}, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    return dest


@contextmanager
def shot_on_failure(page, name):
    try:
        yield
    except BaseException:
        page.screenshot(path=SHOTS / f"{name}-failed.png")
        raise


def run_in_lab(browser, lab, name, timeout_s):
    """Open ``name`` (in the server's root) and run all its cells; assert the run is clean (no error
    output, every widget rendered, no echoed return value); the page."""
    page = lab_ui.open_notebook(browser, lab, name)
    with shot_on_failure(page, name):
        lab_ui.run_all_cells(page, timeout_s)
        lab_ui.wait_for_widgets(page)
    page.locator(".widget-interact").scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / f"{name}-1-ran.png")
    assert lab_ui.problems(page) == []
    nb = lab_ui.save_and_read(page, lab, name)
    assert lab_ui.error_outputs(nb) == [] and lab_ui.echoed_functions(nb) == []
    return page, nb


def test_deployment_planner_in_jupyterlab(lab, browser):
    name = "deployment_planner.ipynb"
    shutil.copy(runs.NOTEBOOKS / name, lab.root / name)  # a copy: JupyterLab never saves over the original
    page, nb = run_in_lab(browser, lab, name, timeout_s=60)
    widget_cell = next(c for c in nb["cells"] if "widgets.interactive" in "".join(c["source"]))
    assert [o["output_type"] for o in widget_cell["outputs"]] == ["display_data"]  # the widget and nothing else
    assert "application/vnd.jupyter.widget-view+json" in widget_cell["outputs"][0]["data"]
    with shot_on_failure(page, name):
        move_the_planner(page)
    page.locator(".widget-interact").scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / f"{name}-2-moved.png")
    page.close()


def move_the_planner(page):
    first = lab_ui.interact_text(page)
    assert first.startswith("LN-Super: 49.9B parameters") and "latency" in first
    lab_ui.widget(page, "dropdown", "model").locator("select").select_option("LN-Ultra")
    text = lab_ui.wait_for_text(page, "LN-Ultra's")
    assert "LN-Ultra's 253B weights need 253 GB in FP8: they do not fit on 1 x H100" in text
    assert "latency" not in text  # no numbers that assume the weights fit
    lab_ui.widget(page, "dropdown", "TP").locator("select").select_option("8")
    assert "TP8 does not divide 1 GPUs" in lab_ui.wait_for_text(page, "does not divide")
    assert lab_ui.press_slider(page, "GPUs", "End") == "64"
    text = lab_ui.wait_for_text(page, "64 x H100")
    assert "LN-Ultra: 253B parameters" in text and "8 replicas of 8 GPUs" in text and "latency" in text


def test_budget_explorer_in_jupyterlab_on_the_smoke_run(smoke_run, lab, browser):
    name = "02_architecture_search.ipynb"
    prepare(runs.NOTEBOOKS / name, smoke_run, lab.root / name)
    page, nb = run_in_lab(browser, lab, name, timeout_s=120)
    swept = yaml.safe_load(smoke_run.read_text())["stages"][name.removesuffix(".ipynb")]["budgets"][0]
    with shot_on_failure(page, name):
        first = lab_ui.interact_text(page)
        assert "priced decode time" in first and "not assembled in the sweep" in first  # at the slider's 0.50
        steps = round((swept - 0.5) / 0.05)  # the slider's step; to the budget the sweep assembled
        moved = lab_ui.press_slider(page, "budget", *["ArrowRight" if steps > 0 else "ArrowLeft"] * abs(steps))
        assert moved == f"{swept:.2f}"
        text = lab_ui.wait_for_text(page, "measured:")
        assert text != first and "x decode throughput" in text and "nan" not in text
    page.locator(".widget-interact").scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / f"{name}-2-moved.png")
    page.close()


def batch_entry(b: int) -> dict:
    return {"batch": b, "step": 2 * b, "pass_rates": [0.1, 0.4, 0.6], "target": [0.1] * 10, "target_mean": 0.5,
            "reward_mean": 0.5 + 0.1 * b, "reward_std": 0.2, "accuracy_reward": 0.3, "completion_len": 30.0}


def wait_for_status(page, text: str) -> None:
    """Until the live panel's status line (redrawn by its thread) contains ``text``."""
    page.wait_for_function("(t) => document.querySelector('.jp-NotebookPanel .widget-html')?.innerText.includes(t)",
                           arg=text, timeout=20e3)


def open_live_panel(browser, lab, name: str, run_dir, stage: str):
    """A one-cell notebook showing ``rlview.live_panel`` on ``run_dir``'s ``stage``, opened in the lab."""
    import json

    cell = f"from lnkit import rlview\nrlview.live_panel({str(run_dir)!r}, {stage!r}, every_s=1)"
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "0", "metadata": {}, "outputs": [],
                     "source": cell}], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                    "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (lab.root / name).write_text(json.dumps(nb))
    return lab_ui.open_notebook(browser, lab, name)


def test_live_rl_panel_refreshes_in_jupyterlab(lab, browser, tmp_path):
    """Stage 07's live panel pointed at a run folder that another process is writing: it shows the first
    rollout batch, picks up the next one within seconds, and stops once the stage's marker appears."""
    import json

    from lnkit.checkpoints import MARKER

    d = tmp_path / "run" / "07_grpo"
    d.mkdir(parents=True)
    (d / "batches.jsonl").write_text(json.dumps(batch_entry(0)) + "\n")
    name = "live_panel.ipynb"
    page = open_live_panel(browser, lab, name, tmp_path / "run", "07_grpo")
    status = page.locator(".jp-NotebookPanel .widget-html")
    with shot_on_failure(page, name):
        lab_ui.run_all_cells(page, 60)
        lab_ui.wait_for_widgets(page)
        assert lab_ui.problems(page) == []
        assert "running; rollout batch 0" in status.inner_text()
        assert page.locator(".jp-NotebookPanel .widget-image").get_attribute("src").startswith("blob:")
        with open(d / "batches.jsonl", "a") as f:  # the run goes on elsewhere
            f.write(json.dumps(batch_entry(1)) + "\n")
        wait_for_status(page, "rollout batch 1")
        (d / MARKER).write_text("{}")
        wait_for_status(page, "finished")
    page.screenshot(path=SHOTS / f"{name}-1-live.png")
    page.close()


PHASE_FIELDS = ["phase", "mode", "win_rate_gold", "win_low", "win_high", "gold_score", "win_rate_rm",
                "prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"]


def phase_rows(phase: str, win: float) -> str:
    return "".join(",".join([phase, mode, str(win), "0.4", "0.6", "4.0", "", "0.3", "0.4", "0.3", "0.4"]) + "\n"
                   for mode in ("on", "off"))


def test_live_panel_follows_stage_08_in_jupyterlab(lab, browser, tmp_path):
    """The same panel on stage 08's files: phases evaluated and training logs appear as another process
    writes them, and it stops once the stage's marker appears."""
    from lnkit.checkpoints import MARKER

    d = tmp_path / "run" / "08_alignment"
    (d / "rloo").mkdir(parents=True)
    (d / "phases.csv").write_text(",".join(PHASE_FIELDS) + "\n" + phase_rows("start", 0.5))
    name = "live_panel_08.ipynb"
    page = open_live_panel(browser, lab, name, tmp_path / "run", "08_alignment")
    status = page.locator(".jp-NotebookPanel .widget-html")
    with shot_on_failure(page, name):
        lab_ui.run_all_cells(page, 60)
        lab_ui.wait_for_widgets(page)
        assert lab_ui.problems(page) == []
        assert "running; phases evaluated: start;" in status.inner_text()
        (d / "rloo" / "train_log.csv").write_text("step,loss,follow_reward,format_reward,kl\n0,0.1,0.2,0.8,0.0\n"
                                                  "1,0.1,0.3,0.9,0.1\n")
        with open(d / "phases.csv", "a") as f:  # the run goes on elsewhere
            f.write(phase_rows("rloo", 0.55))
        wait_for_status(page, "start, rloo")
        assert "'rloo': 2" in status.inner_text()
        (d / MARKER).write_text("{}")
        wait_for_status(page, "finished")
    page.screenshot(path=SHOTS / f"{name}-1-live.png")
    page.close()


def test_paper_figures_explorer_in_jupyterlab(lab, browser, tmp_path):
    """Stage 10's notebook on a run folder holding only stage 09's files (the tiny run's, shipped in
    tests/fixtures): the figures that need other stages are skipped with a note, and the Figures 2/4 explorer
    follows its pickers."""
    run_dir = tmp_path / "run"
    ev = run_dir / "09_evaluation"
    ev.mkdir(parents=True)
    for f in ("results.csv", "models.json"):
        shutil.copy(runs.REPO / "tests" / "fixtures" / "evaluation_tiny" / f, ev / f)
    (ev / "_COMPLETE.json").write_text("{}")
    run_file = tmp_path / "ui10.yaml"
    run_file.write_text(yaml.safe_dump({"run": "ui10", "run_dir": str(run_dir),
                                        "stages": {"10_paper_figures": {"sweep": "", "progress": False}}}))
    name = "10_paper_figures.ipynb"
    prepare(runs.NOTEBOOKS / name, run_file, lab.root / name)
    page, nb = run_in_lab(browser, lab, name, timeout_s=120)
    with shot_on_failure(page, name):
        first = lab_ui.wait_for_text(page, "checkpoint: aligned")
        assert "pass@1, all, thinking on" in first and "x the parent's measured decode throughput" in first
        lab_ui.widget(page, "dropdown", "checkpoint").locator("select").select_option(label="parent")
        text = lab_ui.wait_for_text(page, "checkpoint: parent")
        assert "1.00x the parent's" in text
        lab_ui.widget(page, "dropdown", "domain").locator("select").select_option("math")
        text = lab_ui.wait_for_text(page, "pass@1, math, thinking on")
        assert "checkpoint: parent" in text
    outputs = "\n".join(t["text"] for t in lab_ui.output_texts(page) if "text" in t)
    assert "skipped fig3_puzzle_frontier: stage 02_architecture_search has not completed" in outputs
    page.screenshot(path=SHOTS / f"{name}-2-picked.png")
    page.close()
