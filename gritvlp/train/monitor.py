"""Rank-0 monitoring: the TensorBoard names, a metrics.jsonl file and the progress bar.

Every logged name is written here: loss/*, train/*, similarity/*, perf/*, data/*, grit/*.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

LOSS_TERMS = ("itc", "consistency", "itm", "mlm", "flm", "flm_reconstruction", "flm_next", "flm_previous", "distill",
              "distill_objects", "distill_attributes")  # fmt: skip
TRAIN_METRICS = ("itm_acc", "temp")
SIMILARITIES = ("sim_pos", "sim_neg", "sim_itm_neg")
# False negatives in the batch (share of in-batch pairs sharing an image or a caption; of chosen ITM negatives that
# do) and, with connection mining, the chosen negatives per step it turned into positives or replaced.
FALSE_NEGATIVES = ("false_negative_share", "itm_false_negative_share", "converted_negatives", "replaced_negatives")


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

    def log_train(self, step: int, terms: dict[str, float], **extra: float) -> None:
        """terms: the objective's scalars averaged over ranks (loss, itc, ..., sim_itm_neg); extra: lr, grad_norm,
        samples_per_s, step_time_s, skipped_samples and, when known, data_wait_s, tflops and mfu (see
        Trainer.log_step)."""
        scalars = {f"loss/{k}": terms[k] for k in LOSS_TERMS if k in terms}
        scalars["loss/total"] = terms["loss"]
        scalars.update({f"train/{k}": terms[k] for k in TRAIN_METRICS if k in terms})
        scalars.update({f"similarity/{k[4:]}": terms[k] for k in SIMILARITIES if k in terms})
        scalars.update({f"grit/{k}": terms[k] for k in FALSE_NEGATIVES if k in terms})
        for name in ("lr", "grad_norm"):
            if extra.get(name) is not None:
                scalars[f"train/{name}"] = extra[name]
        scalars["perf/samples_per_s"] = extra["samples_per_s"]
        scalars["perf/step_time_s"] = extra["step_time_s"]
        scalars.update({f"perf/{k}": extra[k] for k in ("tflops", "mfu", "data_wait_s") if extra.get(k) is not None})
        scalars["data/skipped_samples"] = extra["skipped_samples"]
        self.log(step, scalars)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation metrics (ALBEF's retrieval names, hard_<scorer>_<kind>, best_<name>) under eval/*."""
        self.log(step, {f"eval/{name}": value for name, value in metrics.items()})

    def log_images(self, step: int, name: str, image) -> None:
        """An HWC uint8 array as an image in TensorBoard (rank 0 only, like every scalar)."""
        if self.enabled:
            self.writer.add_image(name, image, step, dataformats="HWC")

    def log_grouping(self, step: int, seconds: float, epoch_seconds: float, similarity: dict[str, float]) -> None:
        """Grouping time and, for the batches of the next epoch, the mean image-text cosine of their in-batch
        negatives beside that of random batches of the same samples (in the features they were grouped by): how
        much harder grouping made the negatives."""
        self.log(step, {"grit/grouping_time_s": seconds, "grit/grouping_share": seconds / max(epoch_seconds, 1e-9),
                        "grit/negative_cosine_grouped": similarity["grouped"],
                        "grit/negative_cosine_random": similarity["random"]})  # fmt: skip

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in scalars.items() if k in ("loss/total", "loss/itc", "loss/mlm")}
        if shown:
            self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
