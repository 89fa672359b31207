"""What a training run shows and leaves behind: RUN/metrics.jsonl (one JSON object per optimiser
step), a progress bar on a terminal (plain lines otherwise), TensorBoard scalars when
tensorboard is installed, and loss-curve PNGs (also ``arwkv plot RUN``)."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from ..files import write_atomic

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path, up_to_step: int | None = None) -> list[dict]:
    """The complete records of RUN/metrics.jsonl (a line cut short by a killed run is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(record, dict)
            and "step" in record
            and (up_to_step is None or record["step"] <= up_to_step)
        ):
            records.append(record)
    return records


class MetricsLog:
    """Appends one line per step to RUN/metrics.jsonl, flushed at once. On resume from step s,
    the file is first rewritten (atomically) with the records up to s only, so a resumed run's
    log reads exactly like an uninterrupted one."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS
        if resume_step is not None:
            kept = read_metrics(run_dir, resume_step)
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = None
        try:  # TensorBoard only when it is installed
            from torch.utils.tensorboard import SummaryWriter

            # records after resume_step (written before the kill) are dropped, as in metrics.jsonl
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        """One step's record: a line of metrics.jsonl (flushed) and its numbers to TensorBoard."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class Progress:
    """tqdm's bar (tokens/s, loss, lr, ETA) on a terminal; a plain line every ``every`` steps
    otherwise (logs, CI, nohup)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.start_step, self.start_time = start, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(step - self.start_step, 1) * (self.total - step)
            print(
                f"step {step}/{self.total} loss {loss:.4g} lr {lr:.2e} {tokens_per_s:.0f} tok/s "
                f"eta {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# What a training record holds besides the loss's parts.
RECORD_KEYS = {"step", "stage", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}


def loss_parts(records: list[dict]) -> list[str]:
    """The numbers a run logged besides the loss and the step's bookkeeping (its ``parts``: stage
    1's layer_I, stage 2's kl/akl and ce, stage 4's reward_accuracy and margin), in order; parts
    that are zero throughout (an unused CE term) are left out."""
    names: dict[str, None] = {}
    for r in records:
        names.update((k, None) for k, v in r.items()
                     if k not in RECORD_KEYS and not k.startswith("val_") and isinstance(v, (int, float)))
    return [n for n in names if any(r.get(n) for r in records)]


def plot_run(run_dir: str | Path) -> Path:
    """RUN/loss.png from RUN/metrics.jsonl (loss_figure). Written to a temporary file, then renamed
    (files.write_atomic)."""
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    if not run.is_dir():
        what = "is not a directory" if run.exists() else "does not exist"
        raise FileNotFoundError(f"run directory {run} {what}, so it holds no training records")
    records = read_metrics(run)
    if not records:
        raise FileNotFoundError(f"{run / METRICS} holds no training records")
    fig = loss_figure(records, run.name)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(run / "loss.png", png.getvalue())


def loss_figure(records: list[dict], title: str = ""):
    """Training (and validation) loss against the step, the loss's parts (when the stage logs
    any), and the learning rate, as a matplotlib figure; the step axis has whole steps only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [r["step"] for r in records]
    parts = loss_parts(records)
    heights = (3, 2, 1) if parts else (3, 1)
    fig, axes = plt.subplots(len(heights), 1, figsize=(7, 2 * sum(heights) / 2 + 2), sharex=True,
                             height_ratios=heights)
    ax_loss, ax_lr = axes[0], axes[-1]
    if parts:  # what the loss is made of: stage 1's per-layer losses, KL and CE, DPO's accuracy
        ax_parts = axes[1]
        for name in parts:
            ax_parts.plot(steps, [r.get(name, float("nan")) for r in records], label=name)
        ax_parts.set_ylabel("parts")
        ax_parts.legend(fontsize="small", ncol=min(len(parts), 4))
        ax_parts.grid(alpha=0.3)
    ax_lr.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole
    ax_loss.plot(steps, [r["loss"] for r in records], label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="validation")
    stage = records[-1].get("stage")
    ax_loss.set_ylabel("loss" + (f" (stage {stage})" if stage else ""))
    ax_loss.set_yscale("log" if min(r["loss"] for r in records) > 0 else "linear")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", 0.0) for r in records], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimiser step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
