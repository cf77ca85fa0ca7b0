"""Start-up progress as the operator sees it: the worker reports ``(stage, done, total)``
over its result channel while it loads (and dequantizes) the model or profiles it; this
turns those reports into tqdm bars on a terminal, and into one INFO line per finished stage
otherwise (log files and pipes get no carriage-return noise).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("fastserve.engine")

STAGES = {
    "load": ("loading weights", "tensor"),
    "load+dequantize": ("loading and dequantizing GGUF weights", "tensor"),
    "profile": ("profiling prefill and decode cost", "point"),
}


class StartupProgress:
    """Consumes the worker's progress messages; ``bars`` None: on when stderr is a tty."""

    def __init__(self, bars: bool | None = None, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self._stage: str | None = None
        self._bar: Any = None
        self._started = 0.0
        self._done = 0
        self._total = 0

    def __call__(self, msg: dict[str, Any]) -> None:
        stage, done, total = str(msg.get("stage")), int(msg["done"]), int(msg["total"])
        if stage != self._stage:
            self.close()
            self._stage, self._started, self._total = stage, time.monotonic(), total
            if self.bars:
                from tqdm import tqdm

                label, unit = STAGES.get(stage, (stage, "it"))
                self._bar = tqdm(total=total, desc=label, unit=unit, file=self.stream,
                                 leave=True, dynamic_ncols=True)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        self._done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        """End the current stage (also when the command answered before reporting 100%)."""
        if self._stage is None:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        label, unit = STAGES.get(self._stage, (self._stage, "it"))
        log.info("%s: %d %ss in %.1f s", label, self._done, unit,
                 time.monotonic() - self._started)
        self._stage = None
