"""A background thread that encodes and writes captures, behind a bounded queue, so that
training stalls at most for the device-to-host copy (and waits only when `maxsize`
captures are already in flight)."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Callable

_STOP = object()


class AsyncWriter:
    def __init__(self, maxsize: int, name: str = "capture-writer", device=None):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._device = device
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], ready=None) -> None:
        """Queue `job`; `ready` (e.g. a CUDA event after non-blocking copies) is waited for
        in the writer thread before the job runs. Blocks while the queue is full."""
        if self.error is None:
            self._q.put((job, ready))

    def _run(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            # A new thread's current device is GPU 0: waiting on an event from there would
            # open a CUDA context on GPU 0 for every rank of the node (hundreds of MB each).
            import torch
            torch.cuda.set_device(self._device)
        while True:
            item = self._q.get()
            try:
                if item is _STOP:
                    return
                job, ready = item
                if self.error is not None:
                    continue  # after a failure, drain without writing
                if ready is not None:
                    ready.synchronize()
                job()
            except BaseException as e:  # reported by the training loop, not raised here
                self.error = e
                traceback.print_exc(file=sys.stderr)
            finally:
                self._q.task_done()

    def drain(self) -> None:
        """Wait until everything queued so far is written (or failed)."""
        self._q.join()

    def close(self) -> None:
        self.drain()
        self._q.put(_STOP)
        self._thread.join()
