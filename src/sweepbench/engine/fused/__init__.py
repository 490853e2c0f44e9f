"""Fused training: K runs of one architecture trained as one stacked model (HFTA-style), through the engine's
one loop (``engine.loop.run_members``), each member seeing what its solo ``engine.train`` run would show its
callbacks. What is here is what stacking needs, no more:

- ``step``: ``PackStep``, the step of K members (one forward, backward and optimizer pass for all), and
  ``train_fused(configs, callbacks)``;
- ``pack``: which runs can share a pack (``pack_key``, ``pack_groups``, ``PACK_RULES``) and the tags that describe it;
- ``stack``: the stacked model (one [K, P] parameter buffer, a vmapped ``functional_call``);
- ``masks``: per-member dropout masks, drawn as the solo runs draw them;
- ``batches``: each member's solo batches, gathered for the pack in one ``index_select``;
- ``optim``: sgd, adam, adamw, rmsprop and adadelta over the stack, per-member hyperparameters;
- ``evaluate``: validation and test of all members in one vmapped pass.
"""

from .pack import MEMBER_FIELDS, SHARED_FIELDS, pack_groups, pack_key
from .step import PackStep, train_fused

__all__ = ["MEMBER_FIELDS", "SHARED_FIELDS", "PackStep", "pack_groups", "pack_key", "train_fused"]
