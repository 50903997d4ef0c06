"""What a headless run shows: the cell each stage notebook is in, its live progress, and a table at the end.

:mod:`lnkit.runs` executes each stage notebook with papermill between ``view = StageView(stage).open()``
and ``view.close()``, passing ``**view.papermill_kwargs()``; papermill hands those to nbclient, and the
view follows the run:

- nbclient's hooks ``on_notebook_start`` and ``on_cell_execute`` give the executed notebook and each code
  cell as it starts: ``[02_architecture_search] cell 4/9: result = run_search(P)`` (its first line);
- papermill writes every stream message of the kernel to the ``stdout_file`` / ``stderr_file`` it is
  given: lnkit's progress bars arrive there as plain-text tqdm, because the view sets ``LNKIT_PROGRESS=text``
  in the environment the kernel inherits (:mod:`lnkit.progress`), and so does whatever a cell prints.

On a terminal the status is one line, rewritten in place (``\\r``): the cell, then the latest bar or
printed line. In a log (stdout not a TTY) it is a line when a cell starts, when a bar passes another 10%
(at most one a second), and otherwise at most one every 10 s; printed lines are never copied out one by
one. Errors are not the view's business: papermill raises them and the runner names cell and error.

The kernels also get a config file (``--IPKernelApp.extra_config_file``) that drops one log record,
ipykernel's warning that it runs over TCP without encryption, and nothing else; see :data:`TCP_WARNING`.

At the end the runner prints :func:`stage_table`: each stage's status, wall time and headline, from the
:data:`LEDGER` that ``run_stage`` keeps and the ``metrics.json`` of the stages that completed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lnkit.explore import HEADLESS_ENV
from lnkit.progress import ENV as PROGRESS_ENV
from lnkit.progress import TEXT as PROGRESS_TEXT

EVERY_S = 10.0  # in a log: at most one line this often, besides cell starts and 10% steps of a bar
MIN_GAP_S = 1.0  # in a log: 10% steps closer together than this are not all printed (a 100% always is)
LOG_WIDTH = 120  # in a log: lines are cut to this many characters
# ipykernel (7.x) logs this when it listens on TCP without CurveZMQ keys, which is how papermill starts
# every kernel. The kernel listens on 127.0.0.1 only and every message is signed with the kernel's key;
# what the warning points at (a local user reading the kernel's outputs) is not worth a warning per stage.
TCP_WARNING = "Kernel is running over TCP without encryption"
# IPython config files are Python: the filter is defined inside the file, so the kernel needs nothing
# importable beyond the standard library to read it (a kernel that could not import lnkit would otherwise
# die before its first cell, hiding the real error).
_KERNEL_CONFIG = '''\
# Written by lnkit.runview for the kernels of python -m lnkit.runs: drop one warning, keep every other.
import logging


class HideTcpWarning(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith({warning!r})


c.IPKernelApp.logging_config = {{
    "filters": {{"lnkit_hide_tcp_warning": {{"()": HideTcpWarning}}}},
    "handlers": {{"console": {{"filters": ["lnkit_hide_tcp_warning"]}}}},
}}
'''
# A text tqdm frame: "desc:  40%|████      | 960/2400 [00:30<00:45, 32.0it/s, loss=2.3]".
_BAR = re.compile(r"^(?P<desc>.*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<rest>.*)$")


def kernel_config_source() -> str:
    """The IPython config file given to each kernel (see :data:`TCP_WARNING`)."""
    return _KERNEL_CONFIG.format(warning=TCP_WARNING)


def parse_bar(line: str) -> tuple[str, str, int] | None:
    """A text tqdm frame as ``(desc, compact text without the bar, percent)``, or None for other text.

    >>> parse_bar("parent:  40%|████      | 960/2400 [00:30<00:45, 32.0it/s]")
    ('parent', 'parent 40% 960/2400 [00:30<00:45, 32.0it/s]', 40)
    >>> parse_bar("accuracy 40% | 2 of 5") is None
    True
    """
    m = _BAR.match(line.strip())
    if not m:
        return None
    desc, pct = m["desc"].strip(), int(m["pct"])
    return desc, f"{desc} {pct}% {m['rest']}".strip(), pct


class StageView:
    """Shows one stage notebook's execution while papermill runs it; see the module docstring.

    ``out`` is where the status goes (default ``sys.stdout``), ``tty`` whether to rewrite one line in place
    (default: whether ``out`` is a terminal), ``clock`` a monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, stage: str, out=None, tty: bool | None = None, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.out, self.every_s, self.clock = stage, out or sys.stdout, every_s, clock
        self.tty = self.out.isatty() if tty is None else tty
        self.ordinal: dict[int, int] = {}  # notebook cell index -> its number among the executed code cells
        self.cell, self.source = "", ""  # "cell 4/9", the cell's first line
        self.detail, self._bar, self._decile = "", None, -1  # latest bar or printed line; the bar's desc
        self._partial = {"stdout": "", "stderr": ""}  # text after the last \r or \n, per stream
        self._last_print, self._drawn = float("-inf"), False
        self.config_file: Path | None = None  # written by open()
        self._stack = contextlib.ExitStack()

    # -- the kernel's set-up: environment and config file, for the duration of the stage ------------------
    def open(self) -> StageView:
        """Set ``LNKIT_PROGRESS=text`` and ``LNKIT_HEADLESS=1`` (the kernel inherits the runner's environment;
        :mod:`lnkit.explore`) and write the kernel's config file, until :meth:`close`."""
        for key, value in ((PROGRESS_ENV, PROGRESS_TEXT), (HEADLESS_ENV, "1")):
            self._stack.callback(_restore_env, key, os.environ.get(key))
            os.environ[key] = value
        folder = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="lnkit-kernel-")))
        self.config_file = folder / "lnkit_kernel_config.py"
        self.config_file.write_text(kernel_config_source())
        return self

    def __enter__(self) -> StageView:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close(keep=exc[0] is not None)

    def papermill_kwargs(self) -> dict:
        """Keyword arguments for ``papermill.execute_notebook``; papermill passes the ones it does not know
        to nbclient's ``NotebookClient`` (its hooks, ``extra_arguments``, ``coalesce_streams``)."""
        kw = {"stdout_file": _Stream(self, "stdout"), "stderr_file": _Stream(self, "stderr"),
              "on_notebook_start": self.notebook_start, "on_cell_execute": self.cell_execute,
              # the executed notebook keeps each bar's last frame, not one output per redraw
              "coalesce_streams": True}
        if self.config_file is not None:
            kw["extra_arguments"] = [f"--IPKernelApp.extra_config_file={self.config_file}"]
        return kw

    # -- nbclient's hooks -------------------------------------------------------------------------------
    def notebook_start(self, notebook, **_) -> None:
        code = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and c.source.strip()
                and "skip-execution" not in c.get("metadata", {}).get("tags", [])]
        self.ordinal = {i: k + 1 for k, i in enumerate(code)}

    def cell_execute(self, cell, cell_index: int, **_) -> None:
        k = self.ordinal.get(cell_index, cell_index + 1)
        self.cell = f"cell {k}/{len(self.ordinal) or '?'}"
        lines = [s.strip() for s in cell.source.splitlines() if s.strip()]
        # the first line of code names the cell best; a cell of comments and literals shows its first line
        self.source = next((s for s in lines if not s.startswith("#")), lines[0] if lines else "")
        self.detail, self._bar, self._decile = "", None, -1
        self._show(cell_start=True)

    # -- the kernel's streams -------------------------------------------------------------------------------
    def feed(self, name: str, text: str) -> None:
        """Take one stream message's text: a tqdm frame (``\\r...``) or printed lines."""
        pieces = re.split(r"[\r\n]", self._partial.get(name, "") + text)
        self._partial[name] = pieces[-1]  # unterminated: the next message may continue it
        line = next((p.strip() for p in reversed(pieces) if p.strip()), "")
        if not line:
            return
        bar = parse_bar(line)
        if bar is None:
            self.detail, pct = line, None
        else:
            desc, self.detail, pct = bar
            if desc != self._bar:
                self._bar, self._decile = desc, -1
        self._show(pct=pct)

    # -- the status line -------------------------------------------------------------------------------
    def status(self, width: int | None = None) -> str:
        """``[stage] cell 4/9: first line | latest bar or printed line``, cut to ``width`` characters
        (the cell's line gives way first)."""
        head = f"[{self.stage}] {self.cell}"
        tail = f" | {self.detail}" if self.detail else ""
        src = f": {self.source}" if self.source else ""
        if width is None or len(head + src + tail) <= width:
            return head + src + tail
        room = width - len(head) - len(tail)
        return _cut(head + (_cut(src, room) if room >= 12 else "") + tail, width)

    def _show(self, cell_start: bool = False, pct: int | None = None) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._write("\r" + self.status(width) + "\x1b[K")
            self._drawn = True
            return
        now = self.clock()
        due = cell_start or now - self._last_print >= self.every_s
        if pct is not None and pct // 10 > self._decile and (pct == 100 or now - self._last_print >= MIN_GAP_S):
            due = True
        if not due:
            return
        if pct is not None:
            self._decile = pct // 10
        line = f"[{self.stage}] {self.cell}: {self.source}" if cell_start else \
            f"[{self.stage}] {self.cell} | {self.detail}"
        self._write(_cut(line, LOG_WIDTH) + "\n")
        self._last_print = now

    def close(self, keep: bool = False) -> None:
        """End the status line, erased on a terminal (the runner prints what happened) or kept with ``keep``
        (a failed or interrupted stage: it shows where the stage was); undo :meth:`open`."""
        if self.tty and self._drawn:
            self._write("\n" if keep else "\r\x1b[K")
            self._drawn = False
        self._stack.close()
        self.config_file = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class _Stream:
    """The file-like object papermill writes one of the kernel's streams to."""

    def __init__(self, view: StageView, name: str):
        self.view, self.name = view, name

    def write(self, text: str) -> None:
        self.view.feed(self.name, text)

    def flush(self) -> None:
        pass


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _restore_env(key: str, old: str | None) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


# -- the end of a run --------------------------------------------------------------------------------------
class Ledger:
    """What became of each stage ``run_stage`` was given: ``done``, ``failed`` or ``interrupted``, and its
    wall time. One run at a time per process; :func:`print_summary` empties it."""

    def __init__(self):
        self.stages: dict[str, tuple[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.stages)

    def record(self, stage: str, status: str, seconds: float) -> None:
        self.stages[stage] = (status, seconds)

    def rows(self, names: list[str]) -> list[tuple[str, str, float | None]]:
        """``(stage, status, seconds)`` for each of the run's stages, in order. A stage the runner never
        gave to ``run_stage`` was skipped (complete) if it comes before the one that stopped the run, and
        not run after it."""
        stop = next((i for i, n in enumerate(names) if n in self.stages and self.stages[n][0] != "done"),
                    len(names))
        rows = []
        for i, name in enumerate(names):
            status, seconds = self.stages.get(name, ("skipped" if i < stop else "not run", None))
            rows.append((name, status, seconds))
        return rows


LEDGER = Ledger()


def stage_table(rows: list[tuple[str, str, float | None]], run_dir: str | Path,
                headline_for: Callable[[str, dict], str]) -> str:
    """A table of ``(stage, status, seconds)`` rows with each stage's wall time and, for a stage that is
    done or was skipped as complete, ``headline_for(stage, metrics)`` on its ``<run_dir>/<stage>/metrics.json``.

    >>> print(stage_table([("00_parent", "failed", 75.0), ("01_block_library", "not run", None)], "/nowhere",
    ...                   lambda s, m: ""))
    stage             status    wall  headline
    00_parent         failed   1m15s
    01_block_library  not run      -
    """
    table = [("stage", "status", "wall", "headline")]
    for stage, status, seconds in rows:
        head = _headline(Path(run_dir) / stage / "metrics.json", stage, headline_for) \
            if status in ("done", "skipped") else ""
        table.append((stage, status, "-" if seconds is None else _duration(seconds), head))
    w = [max(len(r[i]) for r in table) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in table)


def print_summary(names: list[str], run_dir: str | Path, headline_for: Callable[[str, dict], str],
                  out=None) -> None:
    """Print the table of the run's stages ``names`` from :data:`LEDGER`, then empty the ledger."""
    out = out or sys.stdout
    out.write("\n" + stage_table(LEDGER.rows(names), run_dir, headline_for) + "\n")
    out.flush()
    LEDGER.stages.clear()


def _headline(path: Path, stage: str, headline_for: Callable[[str, dict], str]) -> str:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"(no readable {path.name})"
    try:
        return headline_for(stage, metrics)
    except Exception as e:  # the table is printed on the way out of a failed run: it must not raise
        return f"(no headline: {type(e).__name__}: {e})"


def _duration(seconds: float) -> str:
    """
    >>> [_duration(s) for s in (4.2, 75, 3725)]
    ['4 s', '1m15s', '1h02m']
    """
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
