"""A notebook's explorer widget, live in JupyterLab and a plain first state in a headless run.

``explore.interact(fn, **controls)`` is ``ipywidgets.interact`` in a kernel someone looks at. In a headless
run (``python -m lnkit.runs``, whose kernels inherit ``LNKIT_HEADLESS=1`` from :mod:`lnkit.runview`) there
is no one to move a slider: it calls ``fn`` once with the controls' initial values, so the executed
notebook shows the same first state, and creates no widget. Why not the widget anyway: stage 02's explorer
(a MIP solved inside the widget's output capture) left papermill waiting forever for the cell's reply, the
kernel idle, four times in full test runs, with ipykernel 7.4 and again with 6.31 (docs/LOG.md).
"""

from __future__ import annotations

import os

HEADLESS_ENV = "LNKIT_HEADLESS"


def headless() -> bool:
    """True in a kernel started by the headless runner."""
    return os.environ.get(HEADLESS_ENV) == "1"


def interact(fn, **controls):
    """``ipywidgets.interact(fn, **controls)``, or in a headless run ``fn`` called once with each control's
    ``value`` (a plain value is passed as it is); returns the widget, or None.

    >>> os.environ[HEADLESS_ENV] = "1"
    >>> interact(lambda budget, mode: print(budget, mode), budget=type("Slider", (), {"value": 0.5})(), mode="on")
    0.5 on
    >>> del os.environ[HEADLESS_ENV]
    """
    if headless():
        fn(**{k: getattr(c, "value", c) for k, c in controls.items()})
        return None
    import ipywidgets as widgets

    return widgets.interact(fn, **controls)
