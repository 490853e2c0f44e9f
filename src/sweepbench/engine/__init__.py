"""The one PyTorch engine: ``train(config, callbacks)`` and what it is made of.

- ``loop``: the one loop (``run_members``: setup, epochs, timing, evaluation, the best epoch, checkpoints, the
  callbacks' hooks, how a run ends) over a ``Step``, and ``train``, a solo run;
- ``solo``: the step of one model (``SoloStep``) and ``evaluate``;
- ``capture``: that step compiled (``step = "compiled"``) or captured in a CUDA graph (``step = "graph"``);
- ``members``: one member of a training (a solo run has one): its history, result and callbacks;
- ``results``: what a run produces (``EpochRecord``, ``Evaluation``, ``RunResult``, ``best_record``);
- ``callbacks``: the callback interface (``Callback``, ``TrainContext``, ``StopTraining``) and ``ProgressBar``;
- ``loaders``: training batches (``DeviceLoader``, ``TorchvisionLoader``) and on-device preprocessing;
- ``optimizer``: the optimizer over contiguous parameter buffers;
- ``checkpoint``: what a checkpoint holds, saving and loading it;
- ``interrupts``: SIGTERM as an interruption (``Terminated``, ``sigterm_interrupts``);
- ``fused``: the step of K runs of one architecture trained as one stacked model (``PackStep``, ``train_fused``,
  ``pack_key``, ``pack_groups``).

Devices and precisions are registry entries (``sweepbench.devices``, ``sweepbench.precisions``); environment
facts live in ``sweepbench.hardware``, which re-exports them; the ones the engine has always offered are
re-exported here.
"""

from ..hardware import autocast, device_name, peak_memory_mb, resolve_device
from .callbacks import Callback, ProgressBar, StopTraining, TrainContext
from .checkpoint import CHECKPOINT_FORMAT, checkpoint_state, load_checkpoint, restore_checkpoint, save_checkpoint
from .fused import PackStep, pack_groups, pack_key, train_fused
from .interrupts import Terminated, interrupt_message, sigterm_interrupts
from .loaders import AUGMENT_PAD, DeviceLoader, TorchvisionLoader, normalise, random_crop_flip
from .loop import run_members, train
from .optimizer import FUSED_OPTIMIZERS, build_optimizer, contiguous_parameters, zero_gradients
from .results import EpochRecord, Evaluation, RunResult, best_record
from .solo import SoloStep, evaluate

__all__ = ["AUGMENT_PAD", "CHECKPOINT_FORMAT", "FUSED_OPTIMIZERS", "Callback", "DeviceLoader", "EpochRecord",
           "Evaluation", "PackStep", "ProgressBar", "RunResult", "SoloStep", "StopTraining", "Terminated",
           "TorchvisionLoader", "TrainContext", "autocast", "best_record", "build_optimizer", "checkpoint_state",
           "contiguous_parameters", "device_name", "evaluate", "interrupt_message", "load_checkpoint", "normalise",
           "pack_groups", "pack_key", "peak_memory_mb", "random_crop_flip", "resolve_device", "restore_checkpoint",
           "run_members", "save_checkpoint", "sigterm_interrupts", "train", "train_fused", "zero_gradients"]
