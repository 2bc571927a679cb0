"""A checkpoint that takes long, for the launcher's preemption tests: with this folder on
PYTHONPATH and SLOW_CHECKPOINT_S=N set, every Python process of a job (torchrun and its
ranks) imports this at startup, and trainer.checkpoint.save sleeps N seconds before it
saves whenever the rank has been asked to stop (its stop-signal handler, trainer.train's
StopSignals, has received a signal): the checkpoint a preemption waits for, and no other.

The wrap is put in when trainer.checkpoint is imported (an import hook), not here: torchrun
must not import torch before it starts its ranks. Without SLOW_CHECKPOINT_S this does
nothing."""

from __future__ import annotations

import os

_DELAY = os.environ.get("SLOW_CHECKPOINT_S")


def _stop_requested() -> bool:
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    return getattr(getattr(handler, "__self__", None), "received", None) is not None


def _wrap(module) -> None:
    import functools
    import sys
    import time

    save = module.save

    @functools.wraps(save)
    def slow_save(*args, **kwargs):
        if _stop_requested():
            print(f"[slow_checkpoint] pid {os.getpid()}: sleeping {_DELAY} s before the "
                  f"stop's checkpoint", file=sys.stderr, flush=True)
            time.sleep(float(_DELAY))
        return save(*args, **kwargs)

    module.save = slow_save


if _DELAY:
    import importlib.abc
    import importlib.machinery
    import sys

    class _Loader(importlib.abc.Loader):
        def __init__(self, inner):
            self.inner = inner

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            _wrap(module)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trainer.checkpoint":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec

    sys.meta_path.insert(0, _Finder())
