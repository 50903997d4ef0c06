"""What a headless run shows (lnkit.runview): the status line built from a kernel's messages, the table at
the end, and tiny stage notebooks executed by real papermill through the runner's own code path."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import nbformat
import pytest

from lnkit import runs, runview
from lnkit.params import RunParams
from lnkit.runview import LEDGER, StageView, stage_table

# The stream messages a real kernel sent for a cell that prints, runs a 30-step text bar and prints again,
# as papermill hands them to stdout_file / stderr_file.
RECORDED = [
    ("stdout", "hello\n"),
    ("stderr", "\rloop:   0%|          | 0/30 [00:00<?, ?it/s]"),
    ("stderr", "\rloop:  33%|███▎      | 10/30 [00:01<00:02,  9.98it/s]"),
    ("stderr", "\rloop:  67%|██████▋   | 20/30 [00:02<00:01,  9.97it/s]"),
    ("stderr", "\rloop: 100%|██████████| 30/30 [00:03<00:00,  9.97it/s]"),
    ("stderr", "\rloop: 100%|██████████| 30/30 [00:03<00:00,  9.97it/s]"),
    ("stdout", "bye\n"),
    ("stderr", "\n"),
]
PARAMETERS = 'run_dir = ""\nfigures_dir = ""\nseed = 0\ndevice = "cpu"\nthreads = 0\nprogress = True'


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TParams(RunParams):
    STAGE = "t_stage"


def notebook(*sources: str) -> nbformat.NotebookNode:
    """A stage-like notebook: a parameters cell, a markdown cell, then one code cell per source."""
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_markdown_cell("A test stage."),
                *[nbformat.v4.new_code_cell(textwrap.dedent(s).strip()) for s in sources]]
    return nb


def started(view: StageView, nb: nbformat.NotebookNode, cell_index: int) -> None:
    view.notebook_start(notebook=nb)
    view.cell_execute(cell=nb.cells[cell_index], cell_index=cell_index)


def test_log_shows_cell_starts_and_ten_percent_steps_not_printed_lines():
    out, clock = io.StringIO(), Clock()
    view = StageView("02_search", out=out, tty=False, clock=clock)
    nb = notebook("x = 1", "# run the search\nresult = run_search(P)", "print(result)")
    started(view, nb, 3)
    for name, text in RECORDED:
        clock.t += 1.0
        view.feed(name, text)
    clock.t += 3.0
    view.feed("stdout", "done soon\n")  # 4 s after the last line: not yet
    clock.t += 10.0
    view.feed("stdout", "many\nlines\nlast line\n")  # 14 s after: the last line only
    assert out.getvalue().splitlines() == [
        "[02_search] cell 3/4: result = run_search(P)",  # the first line of code, not the comment
        "[02_search] cell 3/4 | loop 0% 0/30 [00:00<?, ?it/s]",
        "[02_search] cell 3/4 | loop 33% 10/30 [00:01<00:02,  9.98it/s]",
        "[02_search] cell 3/4 | loop 67% 20/30 [00:02<00:01,  9.97it/s]",
        "[02_search] cell 3/4 | loop 100% 30/30 [00:03<00:00,  9.97it/s]",
        "[02_search] cell 3/4 | last line",
    ]


def test_log_thins_fast_bars_but_keeps_their_end_and_joins_split_messages():
    out, clock = io.StringIO(), Clock()
    view = StageView("s", out=out, tty=False, clock=clock)
    started(view, notebook("for i in bar(range(100)): pass"), 2)
    for n in range(0, 101, 5):  # a bar that runs through in well under a second
        clock.t += 0.01
        view.feed("stderr", f"\rfast: {n:3d}%|#| {n}/100 [00:00<00:00, 999it/s]")
    clock.t += 0.01
    view.feed("stderr", "\rslow:  4")  # one frame split over two messages
    view.feed("stderr", "0%|####      | 4/10 [00:01<00:01, 3.0it/s]")
    lines = out.getvalue().splitlines()
    assert lines == ["[s] cell 2/2: for i in bar(range(100)): pass",
                     "[s] cell 2/2 | fast 100% 100/100 [00:00<00:00, 999it/s]"]
    clock.t += 2.0
    view.feed("stderr", "\rslow:  50%|#####     | 5/10 [00:02<00:01, 3.0it/s]")
    assert out.getvalue().splitlines()[-1] == "[s] cell 2/2 | slow 50% 5/10 [00:02<00:01, 3.0it/s]"
    assert view.detail.startswith("slow 50%")


def test_terminal_status_is_one_line_rewritten_in_place():
    out = io.StringIO()
    view = StageView("00_parent", out=out, tty=True)
    nb = notebook("log = train(P)  # a long comment " + "x" * 200)
    started(view, nb, 2)
    for name, text in RECORDED[:4]:
        view.feed(name, text)
    writes = out.getvalue()
    assert "\n" not in writes and writes.count("\r") == 5 and writes.endswith("\x1b[K")
    assert writes.split("\r")[-1].startswith("[00_parent] cell 2/2: log = train(P)")
    assert "| loop 67% 20/30" in writes.split("\r")[-1]
    line = view.status(width=80)  # the cell's line gives way to the bar
    assert len(line) == 80 and line.startswith("[00_parent] cell 2/2: log = tra") and line.endswith("9.97it/s]")
    assert view.status(width=50) == "[00_parent] cell 2/2 | loop 67% 20/30 [00:02<00:0…"
    view.close()
    assert out.getvalue().endswith("\r\x1b[K")  # erased: the runner prints "done in" there
    view.cell_execute(cell=nb.cells[2], cell_index=2)
    view.close(keep=True)
    assert out.getvalue().endswith("\x1b[K\n")  # a failed stage keeps its last status


def test_kernel_config_drops_the_tcp_warning_and_nothing_else():
    from traitlets.config import Config

    c = Config()
    exec(runview.kernel_config_source(), {"c": c})  # what the kernel does with its config file
    cfg = c.IPKernelApp.logging_config
    hide = cfg["filters"]["lnkit_hide_tcp_warning"]["()"]()
    assert cfg["handlers"]["console"]["filters"] == ["lnkit_hide_tcp_warning"]

    def record(msg):
        return logging.LogRecord("IPKernelApp", logging.WARNING, __file__, 1, msg, None, None)

    assert not hide.filter(record(runview.TCP_WARNING + ". All communication (including code and outputs)"))
    assert hide.filter(record("Kernel is running over IPC"))
    assert hide.filter(record("WARNING: something else %s"))


def test_table_statuses_walltimes_and_headlines(tmp_path):
    for stage, metrics in [("a", {"x": 1.5}), ("b", {"y": 2})]:
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.json").write_text(json.dumps(metrics))
    ledger = runview.Ledger()
    ledger.record("b", "done", 3725.0)
    ledger.record("c", "failed", 12.4)
    rows = ledger.rows(["a", "b", "c", "d"])
    assert rows == [("a", "skipped", None), ("b", "done", 3725.0), ("c", "failed", 12.4), ("d", "not run", None)]
    text = stage_table(rows, tmp_path, lambda stage, m: f"x is {m['x']}")
    assert text.splitlines() == [
        "stage  status    wall  headline",
        "a      skipped      -  x is 1.5",
        "b      done     1h02m  (no headline: KeyError: 'x')",
        "c      failed    12 s",
        "d      not run      -",
    ]
    assert runview.Ledger().rows(["a", "b"]) == [("a", "skipped", None), ("b", "skipped", None)]


@pytest.fixture()
def stage_dirs(tmp_path, monkeypatch):
    """The runner pointed at notebooks and outputs under tmp_path."""
    monkeypatch.setattr(runs, "REPO", tmp_path)
    monkeypatch.setattr(runs, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(runs, "OUTPUT", tmp_path / "output")
    (tmp_path / "notebooks").mkdir()
    LEDGER.stages.clear()
    yield tmp_path
    LEDGER.stages.clear()


def test_a_stage_run_by_papermill_streams_cells_and_bars_and_ends_in_the_table(stage_dirs, capfd):
    nbformat.write(notebook(
        """
        import time
        from lnkit.progress import progress_bar
        for i in progress_bar(range(20), desc="steps"):
            time.sleep(0.05)
        for i in range(50):
            print(f"printed line {i}")
        """,
        """
        from lnkit import stage
        from lnkit.params import RunParams
        class TParams(RunParams):
            STAGE = "t_stage"
        stage.finish(TParams(run_dir=run_dir, figures_dir=figures_dir, seed=seed, device=device,
                             threads=threads, progress=progress), {"answer": 42})
        """), stage_dirs / "notebooks" / "t_stage.ipynb")
    p, env = TParams(run_dir=str(stage_dirs / "run")), dict(os.environ)
    out = runs.run_stage("t_stage", p, "r")
    runview.print_summary(["t_stage"], p.run_dir, lambda s, m: f"answer {m['answer']}")
    captured = capfd.readouterr()  # the runner's output, and the kernel's own stderr (fd 2)
    shown = captured.out.splitlines()
    assert shown[0] == "[t_stage] executing notebooks/t_stage.ipynb -> output/r/t_stage.ipynb"
    assert shown[1] == "[t_stage] cell 1/4: run_dir = \"\"" and shown[3] == "[t_stage] cell 3/4: import time"
    assert shown[2] == f'[t_stage] cell 2/4: run_dir = "{p.run_dir}"'  # papermill's cell: its first line of code
    assert "[t_stage] cell 3/4 | steps 100% 20/20" in "\n".join(shown)  # plain-text tqdm, not a widget
    assert not any("printed line" in s for s in shown)
    assert "[t_stage] cell 4/4: from lnkit import stage" in shown
    assert shown[-4].startswith("[t_stage] done in") and shown[-3] == "" and shown[-2].startswith("stage ")
    assert shown[-1].startswith("t_stage  done") and shown[-1].endswith("answer 42")
    assert runview.TCP_WARNING not in captured.err
    assert dict(os.environ) == env  # the runner's own environment is as it was
    outputs = nbformat.read(out, as_version=4).cells[3].outputs  # one coalesced output per stream
    assert [o.name for o in outputs] == ["stdout", "stderr"] and "steps: 100%" in outputs[1].text
    assert "printed line 49" in outputs[0].text


def test_a_failing_cell_is_a_run_error_and_a_failed_row(stage_dirs, capsys):
    nbformat.write(notebook("x = 1", "raise ValueError('boom')"), stage_dirs / "notebooks" / "t_bad.ipynb")
    with pytest.raises(runs.RunError, match=r"stage t_bad failed in notebook .*t_bad.ipynb, cell 4 .*ValueError: boom"):
        runs.run_stage("t_bad", TParams(run_dir=str(stage_dirs / "run")), "r")
    assert LEDGER.stages["t_bad"][0] == "failed"
    assert capsys.readouterr().out.splitlines()[-1] == "[t_bad] cell 4/4: raise ValueError('boom')"
    runview.print_summary(["t_bad", "t_next"], stage_dirs / "run", runs.headline)
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].split()[:2] == ["t_bad", "failed"] and rows[1].split() == ["t_next", "not", "run", "-"]
    assert not LEDGER


def test_ctrl_c_stops_the_stage_and_the_table_says_interrupted(stage_dirs):
    """A real Ctrl-C (SIGINT) while a cell runs: the runner's process stops the kernel, records the stage
    as interrupted and can still print the table."""
    nbformat.write(notebook("import time\nfrom lnkit.progress import progress_bar\n"
                            "for i in progress_bar(range(600), desc='slow'):\n    time.sleep(0.1)"),
                   stage_dirs / "notebooks" / "t_slow.ipynb")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from lnkit import runs, runview
        from lnkit.params import RunParams
        root = Path({str(stage_dirs)!r})
        runs.REPO, runs.NOTEBOOKS, runs.OUTPUT = root, root / "notebooks", root / "output"
        try:
            runs.run_stage("t_slow", RunParams(run_dir=str(root / "run")), "r")
        except KeyboardInterrupt:
            runview.print_summary(["t_slow", "t_after"], root / "run", runs.headline)
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines, t0 = [], time.monotonic()
    while not any("| slow " in s for s in lines) and time.monotonic() - t0 < 120:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    out = rest.splitlines()
    head = next(i for i, s in enumerate(out) if s.startswith("stage ") and "headline" in s)
    table = out[head + 1: head + 3]  # the rows under the header (asyncio may log the kernel's cell error after)
    assert table[0].startswith("t_slow   interrupted") and table[1].startswith("t_after  not run"), rest


def test_a_kernel_that_dies_is_one_line_naming_the_stage_cause_and_resume(stage_dirs, capsys):
    nbformat.write(notebook("import os, signal", "os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would"),
                   stage_dirs / "notebooks" / "t_oom.ipynb")
    with pytest.raises(runs.RunError) as e:
        runs.run_stage("t_oom", TParams(run_dir=str(stage_dirs / "run")), "r")
    message = str(e.value)
    assert message.startswith("stage t_oom: the kernel died running notebook") and "\n" not in message
    assert "lack of memory" in message and "resumes from its last checkpoint" in message
    assert LEDGER.stages["t_oom"][0] == "failed"
    LEDGER.stages.clear()
