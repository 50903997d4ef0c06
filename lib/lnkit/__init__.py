"""lnkit: the Llama-Nemotron pipeline as a flat library, one paper idea per module.

Three layers, checked by import-linter (``pyproject.toml``):

- the runner, :mod:`lnkit.runs`: run files, ``python -m lnkit.runs``, a notebook's ``run`` parameter;
- the stages, :mod:`lnkit.stages` (one module per stage, each with ``Params`` and ``run(p)``; the table of
  stages, notebooks and paper sections is in that package's docstring);
- the components, which never import a stage: :mod:`~lnkit.model` and :mod:`~lnkit.blocks` (the
  ``nemotron-nas`` model), :mod:`~lnkit.puzzle` (block library, scoring, costs, MIP), :mod:`~lnkit.fusion`,
  :mod:`~lnkit.train` (batches, the loop, distillation losses, the parent's mix), :mod:`~lnkit.data` (the
  tiny world, tokenizer, chat template, released schema), :mod:`~lnkit.curation`, :mod:`~lnkit.generate`,
  :mod:`~lnkit.eval`, :mod:`~lnkit.verify`, :mod:`~lnkit.sandbox`, :mod:`~lnkit.deploy`, and the shared
  plumbing :mod:`~lnkit.checkpoints` (which folder a stage means; save and load models),
  :mod:`~lnkit.stage` (a stage's start and finish), :mod:`~lnkit.plots` (every figure, from files),
  :mod:`~lnkit.params`, :mod:`~lnkit.io`.
"""

__version__ = "0.1.0"
