"""The pipeline's stages, one module each, in run order.

Every stage module has the same shape: ``NAME`` (its folder under the run directory and its notebook
``notebooks/<NAME>.ipynb``), ``Params`` (a :class:`~lnkit.params.RunParams` dataclass whose fields match the
notebook's parameters cell), ``needs(p) -> list[str]`` (the earlier stages it reads), ``run(p) -> dict``
(does the stage's work and writes every file a later stage reads; the result's ``"metrics"`` go to
:func:`lnkit.stage.finish`) and ``headline(metrics) -> str`` (one line for the runner's table).

=====================  ==========================  =============================================
module                 stage (folder, notebook)    paper
=====================  ==========================  =============================================
``parent``             ``00_parent``               §1-2 the Instruct parent (the tiny world)
``library``            ``01_block_library``        §2 Puzzle: block library, BLD
``search``             ``02_architecture_search``  §2 Puzzle: scoring, costs, MIP
``fusion``             ``03_ffn_fusion``           §2 FFN Fusion
``distill``            ``04_distillation``         §2.2 knowledge distillation, CPT
``curation``           ``05_reasoning_data``       §3 synthetic reasoning data
``sft``                ``06_reasoning_sft``        §4 reasoning SFT with the toggle
``grpo``               ``07_grpo``                 §5 GRPO with the pass-rate curriculum
``alignment``          ``08_alignment``            §6 RLOO, a reward model, online RPO
``evaluation``         ``09_evaluation``           Tables 3/5: every checkpoint, on and off
``figures``            ``10_paper_figures``        every paper figure the run can redraw, REPORT.md
=====================  ==========================  =============================================

Stages import components (``lnkit.model``, ``lnkit.puzzle``, ``lnkit.train``, ``lnkit.data`` ...) and never
each other; components never import a stage (checked by import-linter, see ``pyproject.toml``).
"""

from __future__ import annotations

from lnkit.stages import (
    alignment,
    curation,
    distill,
    evaluation,
    figures,
    fusion,
    grpo,
    library,
    parent,
    search,
    sft,
)

PIPELINE = [parent, library, search, fusion, distill, curation, sft, grpo, alignment, evaluation, figures]
BY_NAME = {m.NAME: m for m in PIPELINE}
