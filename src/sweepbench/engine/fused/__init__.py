"""Fused training: K runs of one architecture trained as one stacked model (HFTA-style), each member seeing what
its solo ``engine.train`` run would show its callbacks.

- ``loop``: ``train_fused(configs, callbacks)``, the pack's epochs and each member's bookkeeping;
- ``pack``: which runs can share a pack (``pack_key``, ``pack_groups``) and the tags that describe it;
- ``stack``: the stacked model (one [K, P] parameter buffer, a vmapped ``functional_call``);
- ``masks``: per-member dropout masks, drawn as the solo runs draw them;
- ``batches``: each member's solo batches, gathered for the pack in one ``index_select``;
- ``optim``: sgd, adam, adamw, rmsprop and adadelta over the stack, per-member hyperparameters;
- ``evaluate``: validation and test of all members in one vmapped pass;
- ``checkpoint``: a member's checkpoints in the single-model format, resumable by ``engine.train``;
- ``members``: one member's state and how it ends.
"""

from .loop import train_fused
from .pack import MEMBER_FIELDS, SHARED_FIELDS, pack_groups, pack_key

__all__ = ["MEMBER_FIELDS", "SHARED_FIELDS", "pack_groups", "pack_key", "train_fused"]
