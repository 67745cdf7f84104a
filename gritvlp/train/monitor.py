"""Rank-0 monitoring: TensorBoard scalars, a metrics.jsonl file and the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class Monitor:
    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.last_time = time.perf_counter()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        output_dir = Path(output_dir)
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="pre-training", dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    @staticmethod
    def clock() -> float:
        return time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the previous call."""
        now = time.perf_counter()
        elapsed, self.last_time = now - self.last_time, now
        return elapsed

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in scalars.items() if k in ("loss/total", "loss/itc", "loss/mlm")}
        self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
