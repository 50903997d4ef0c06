"""The Figures 2/4 explorer: every checkpoint's accuracy against its measured throughput, one point each.

Pick a domain and a reasoning mode; pick a point (a checkpoint) to see its per-layer architecture (attention
kind and FFN width, as a share of the parent's) and its pass@1 per domain in both modes. Reads stage 09's
``results.csv`` and ``models.json`` only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lnkit.blocks import parse_block_configs


def layers_of(config: dict, parent_ffn: int) -> list[dict]:
    """A config's layers in :func:`lnkit.plots.architecture`'s terms (``attn_parent``, ``attn_kv2``,
    ``attn_linear``, ``attn_noop``; ``ffn_<percent of the parent's width>``, ``ffn_linear``, ``ffn_noop``).

    >>> layers_of({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 8, "intermediate_size": 24}, 24)
    [{'layer': 0, 'attention': 'attn_parent', 'ffn': 'ffn_100'}, {'layer': 1, 'attention': 'attn_parent', 'ffn': 'ffn_100'}]
    """
    n, heads, hidden = config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"]
    kv_parent = config.get("num_key_value_heads") or heads
    if not config.get("block_configs"):
        return [{"layer": i, "attention": "attn_parent", "ffn": f"ffn_{round(100 * config['intermediate_size'] / parent_ffn)}"}
                for i in range(n)]
    out = []
    for i, b in enumerate(parse_block_configs(config["block_configs"], n, heads)):
        a = b.attention
        if a.kind == "attention":
            kv = a.num_kv_heads(heads)
            att = "attn_parent" if kv >= kv_parent else f"attn_kv{kv_parent // max(kv, 1)}"
        else:
            att = {"linear": "attn_linear"}.get(a.kind, "attn_noop")
        f = b.ffn
        ffn = (f"ffn_{round(100 * f.width(hidden) / parent_ffn)}" if f.kind == "ffn" else
               "ffn_linear" if f.kind == "linear" else "ffn_noop")
        out.append({"layer": i, "attention": att, "ffn": ffn})
    return out


def explorer(stage_folder: str | Path):
    """The widget (an ``ipywidgets.VBox``): domain and mode pickers, a checkpoint picker, the scatter with
    the picked point ringed in red, its architecture and its per-domain accuracy."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    from lnkit import plots

    folder = Path(stage_folder)
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    models = json.loads((folder / "models.json").read_text())
    first = models[rows[0]["model"]]["config"]  # the parent: evaluated first
    parent_ffn = first.get("intermediate_size") or first["hidden_size"] * 4
    domains = ["all"] + sorted({r["domain"] for r in rows if r["metric"] == "pass@1" and r["domain"] != "all"})
    domain = w.Dropdown(options=domains, value="all", description="domain")
    mode = w.ToggleButtons(options=["on", "off"], value="on", description="thinking")
    order = [m for m in dict.fromkeys(r["model"] for r in rows) if m in models]  # evaluation order: parent first
    model = w.Dropdown(options=[(models[k]["label"], k) for k in order], value=order[-1], description="checkpoint")
    out = w.Output()

    def draw(*_):
        out.clear_output(wait=True)
        with out:
            fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.3, 1]})
            plots.accuracy_vs_throughput(rows, domain.value, mode.value, ax=a,
                                         title=f"pass@1, {domain.value}, thinking {mode.value}")
            get = {(r["model"], r["domain"], r["mode"], r["metric"]): r for r in rows}
            sx, sy = get.get((model.value, "speed", "-", "decode_tok_s")), get.get((model.value, domain.value,
                                                                                   mode.value, "pass@1"))
            if sx and sy:
                a.plot([float(sx["value"])], [float(sy["value"])], "o", ms=18, mfc="none", mec="red", mew=2)
            plots.architecture(layers_of(models[model.value]["config"], parent_ffn), ax=b,
                               title=f"{models[model.value]['label']}: attention kind and FFN width per layer")
            fig.tight_layout()
            plt.show()
            cells = [r for r in rows if r["model"] == model.value and r["metric"] == "pass@1"]
            table = {}
            for r in cells:
                table.setdefault(r["domain"], {})[r["mode"]] = f"{100 * float(r['value']):.1f}%"
            html = "".join(f"<tr><td>{d}</td><td>{v.get('on', '')}</td><td>{v.get('off', '')}</td></tr>"
                           for d, v in table.items())
            speed = get.get((model.value, "speed", "-", "decode_tok_s_vs_parent"))
            print(f"checkpoint: {models[model.value]['label']}; pass@1, {domain.value}, thinking {mode.value}: "
                  + (f"{100 * float(sy['value']):.1f}%" if sy else "not evaluated")
                  + (f"; {float(speed['value']):.2f}x the parent's measured decode throughput" if speed else ""))
            display(HTML(f"<table class='lnkit-explorer'><tr><th>domain</th><th>on</th><th>off</th></tr>{html}</table>"))

    for c in (domain, mode, model):
        c.observe(draw, names="value")
    draw()
    box = w.VBox([w.HBox([domain, mode]), model, out])
    box.add_class("widget-interact")  # laid out and found (tests/lab_helpers.py) as an interact widget is
    return box
