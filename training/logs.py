"""Training logs with Lightning's own loggers and callbacks, and what DVC reads from them.

    csv_logger(ckdir)        Lightning's CSVLogger beside the MLFlowLogger: every logged step of the run in
                             <checkpoints_dir>/<method>/<phase>/csv/metrics.csv (loss, loss_<term>, lr, throughput)
    monitors(title, every)   LearningRateMonitor (the scheduler is named `lr`), ThroughputMonitor
                             (`train/device/samples_per_sec`, ...) and the progress bar
    progress_bar(title, n)   Lightning's TQDM bar (over optimizer steps) when stderr is a terminal; plain lines
                             every n steps otherwise (CI, `dvc repro` logs), so logs hold no carriage returns
    CSVResume                keeps that CSV exact across a resume (see the class)
    read_history(csv)        Lightning's CSV (one row per logger call: sparse) -> one row per step
    write_plots(history, d)  d/<metric>.csv = step,<metric> for every loss term, lr and samples/s: DVC plots a
                             folder file by file (y = the last column), so every term of any method is plotted
    summarize(history)       the run's DVC metrics: numbers only (final, first and mean of the last 10 logged
                             values of each loss term, samples/s)
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

CSV_DIR = "csv"  # <checkpoint dir>/csv/metrics.csv
THROUGHPUT = ("train/samples_per_sec", "train/device/samples_per_sec")  # global (DDP), else this device's
LAST_N = 10


# ============================================================================================
# loggers and monitors


def csv_logger(ckdir: str | os.PathLike):
    """Lightning's CSVLogger writing <ckdir>/csv/metrics.csv, flushed at every logged step (a killed run
    keeps what it logged; the checkpoint folder is persistent, like the checkpoints)."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(ckdir), name="", version=CSV_DIR, flush_logs_every_n_steps=1)


def interactive() -> bool:
    """A person watching: stderr is a terminal and no CI runner says otherwise."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(title: str, every: int) -> ProgressBar:
    return StepProgressBar(title) if interactive() else LineProgressBar(title, every)


def monitors(title: str, every: int, batch_size_fn) -> list[Callback]:
    """LearningRateMonitor, ThroughputMonitor (over the last `every` batches) and the progress bar. The two
    monitors log to the Trainer's loggers, so they need one (not with fast_dev_run)."""
    return [LearningRateMonitor(logging_interval="step"),
            ThroughputMonitor(batch_size_fn=batch_size_fn, window_size=max(2, int(every))),
            progress_bar(title, every)]


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting optimizer steps out of max_steps from the step a run resumes at
    (training is one endless epoch here, for which Lightning's own count has no total)."""

    def __init__(self, title: str):
        super().__init__()
        self.title = title

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=int(trainer.max_steps))
        bar.n = int(trainer.global_step)
        bar.set_description(self.title)
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, int(trainer.global_step)
        if self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


class LineProgressBar(ProgressBar):
    """Progress as one plain line on stderr every `every` optimizer steps and at the last one:
    `[wplus.stage1] step 20/40 (50%) loss=1.034 loss_rec=... 3.1 s elapsed, ~3.0 s left`."""

    def __init__(self, title: str, every: int):
        super().__init__()
        self.title, self.every = title, max(1, int(every))
        self._enabled = True
        self._t0, self._first, self._last = 0.0, 0, -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._t0, self._first = time.monotonic(), int(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, total = int(trainer.global_step), int(trainer.max_steps)
        if not self._enabled or step == self._last or (step % self.every and step < total):
            return
        self._last = step
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num")
        elapsed = time.monotonic() - self._t0
        done = step - self._first
        left = f", ~{elapsed / done * (total - step):.1f} s left" if done and step < total else ""
        print(f"[{self.title}] step {step}/{total} ({100 * step / max(total, 1):.0f}%) {shown} "
              f"{elapsed:.1f} s elapsed{left}", file=sys.stderr, flush=True)


class CSVResume(Callback):
    """Keeps the CSV of a resumed run exact: each logged step once, none missing.

    Lightning's CSVLogger starts its file anew in every process, and it logs a step's metrics after
    the `on_train_batch_end` hooks, where checkpoints are saved. So every checkpoint carries the rows
    logged so far plus the row of the step it was saved at (from `callback_metrics`, when that step
    is logged), and a run resumed from it starts its CSV with exactly those rows, on whatever machine
    it resumes (a Ray Train restart may land elsewhere).
    """

    def __init__(self, logger):
        self.logger = logger
        self._trainer: Optional[L.Trainer] = None
        self._pending: Optional[dict] = None
        self._restore: Optional[list[dict]] = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # runs before the checkpoint callbacks (Lightning orders them last); the row Lightning will
        # log for this step after the hooks, if it logs this step
        conn = trainer._logger_connector
        if trainer.fit_loop.epoch_loop._should_accumulate() or not conn.should_update_logs:
            self._pending = None
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        self._pending = {**row, "epoch": int(trainer.current_epoch),
                         "step": int(trainer.fit_loop.epoch_loop._batches_that_stepped)}

    def state_dict(self) -> dict:
        t = self._trainer
        if t is None or not t.is_global_zero:
            return {}
        self.logger.save()
        rows = read_rows(Path(self.logger.log_dir) / "metrics.csv")
        p = self._pending
        if p is not None and not any(r.get("step") == p["step"] and set(p) <= set(r) for r in rows):
            rows.append(dict(p))
        return {"rows": rows}

    def load_state_dict(self, state: dict) -> None:
        self._restore = list(state.get("rows") or [])

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # (also when the run resumes at max_steps and trains no step: its CSV is the checkpoint's rows)
        self._put_back(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._put_back(trainer)  # strategies that restore callbacks only after on_fit_start

    def _put_back(self, trainer: L.Trainer) -> None:
        if self._restore is None or not trainer.is_global_zero:
            return
        writer = self.logger.experiment  # (re)opens the CSV: Lightning deletes the old file here
        writer.metrics[:0] = self._restore
        self.logger.save()
        self._restore = None


# ============================================================================================
# the CSV -> DVC plots and metrics


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of Lightning's metrics.csv as {column: number} (empty cells left out)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            row = {k: v for k, v in ((k, _number(v)) for k, v in r.items() if k) if v is not None}
            for k in ("step", "epoch"):
                if k in row:
                    row[k] = int(row[k])
            out.append(row)
    return out


def read_history(path: str | os.PathLike) -> list[dict]:
    """One row per logged step (the logger calls of a step merged; a later value wins), by step."""
    merged: dict[int, dict] = {}
    for r in read_rows(path):
        if "step" in r:
            merged.setdefault(r["step"], {"step": r["step"]}).update(r)
    return [merged[s] for s in sorted(merged)]


def loss_columns(history: Sequence[Mapping[str, float]]) -> list[str]:
    """`loss`, then the `loss_<term>` columns in the order they first appear."""
    cols: list[str] = []
    for row in history:
        cols += [k for k in row if k.startswith("loss") and k not in cols]
    return sorted(cols, key=lambda c: (c != "loss", cols.index(c)))


def throughput(row: Mapping[str, float]) -> Optional[float]:
    return next((row[k] for k in THROUGHPUT if k in row), None)


def plot_series(history: Sequence[Mapping[str, float]]) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} of every loss term, `lr` and `samples_per_sec`."""
    out: dict[str, list[tuple[int, float]]] = {}
    for col in loss_columns(history) + ["lr"]:
        pts = [(int(r["step"]), r[col]) for r in history if col in r]
        if pts:
            out[col] = pts
    pts = [(int(r["step"]), v) for r in history if (v := throughput(r)) is not None]
    if pts:
        out["samples_per_sec"] = pts
    return out


def write_plots(history: Sequence[Mapping[str, float]], folder: str | os.PathLike) -> list[Path]:
    """folder/<name>.csv (header `step,<name>`) for each series of `plot_series`; stale CSVs removed."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.csv"):
        old.unlink()
    written = []
    for name, pts in plot_series(history).items():
        p = d / f"{name}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", name])
            w.writerows([s, f"{v:.6g}"] for s, v in pts)
        written.append(p)
    return written


def summarize(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The run's scalars: for each loss term its last, first and mean-of-the-last-10 logged values
    (`loss`, `loss_first`, `loss_last10_mean`, ...), and the last samples/s."""
    out: dict[str, float] = {}
    for col in loss_columns(history):
        vals = [float(r[col]) for r in history if col in r and math.isfinite(r[col])]
        if vals:
            out[col] = round(vals[-1], 6)
            out[f"{col}_first"] = round(vals[0], 6)
            tail = vals[-LAST_N:]
            out[f"{col}_last{LAST_N}_mean"] = round(sum(tail) / len(tail), 6)
    sps = [v for r in history if (v := throughput(r)) is not None]
    if sps:
        out["samples_per_s"] = round(float(sps[-1]), 3)
    return out
