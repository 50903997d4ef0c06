"""Reinforcement learning components (paper Section 5): rewards, the pass-rate curriculum, the GRPO loss and
the rollout engine. Stage 07 (``lnkit.stages.grpo``) puts them together; nothing here imports a stage."""
