"""training/logs.py: Lightning's CSV -> DVC plots and metrics, and the progress bar on a terminal or not."""
from __future__ import annotations

import sys

import lightning as L
import pytest
import torch

from training import logs

CSV = """epoch,loss,loss_rec,lr,step,train/device/samples_per_sec,train/time
,,,0.0001,0,,
0,1.5,1.25,,0,,
,,,0.0002,1,,
0,1.0,0.75,,1,,
0,,,,1,8.5,0.2
"""


def test_history_plots_and_metrics_from_lightnings_sparse_csv(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    h = logs.read_history(tmp_path / "metrics.csv")  # one row per logger call -> one row per step
    assert h == [{"step": 0, "lr": 1e-4, "epoch": 0, "loss": 1.5, "loss_rec": 1.25},
                 {"step": 1, "lr": 2e-4, "epoch": 0, "loss": 1.0, "loss_rec": 0.75,
                  "train/device/samples_per_sec": 8.5, "train/time": 0.2}]
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss_gone.csv").write_text("step,loss_gone\n0,1\n")  # a series no longer logged
    files = logs.write_plots(h, tmp_path / "plots")
    assert sorted(f.name for f in files) == sorted(f.name for f in (tmp_path / "plots").iterdir()) == [
        "loss.csv", "loss_rec.csv", "lr.csv", "samples_per_sec.csv"]
    assert (tmp_path / "plots" / "loss_rec.csv").read_text() == "step,loss_rec\n0,1.25\n1,0.75\n"
    m = logs.summarize(h)
    assert m == {"loss": 1.0, "loss_first": 1.5, "loss_last10_mean": 1.25, "loss_rec": 0.75, "loss_rec_first": 1.25,
                 "loss_rec_last10_mean": 1.0, "samples_per_s": 8.5}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, i):
        loss = self.lin(batch).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(2, generator=g)


def test_progress_bar_is_tqdm_on_a_terminal_and_plain_lines_otherwise(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert isinstance(logs.progress_bar("x", 2), logs.StepProgressBar)
    monkeypatch.setenv("CI", "true")  # a CI runner with a terminal: plain lines
    assert isinstance(logs.progress_bar("x", 2), logs.LineProgressBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delenv("CI", raising=False)
    bar = logs.progress_bar("tiny.main", 2)
    assert isinstance(bar, logs.LineProgressBar)
    trainer = L.Trainer(max_steps=5, callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        log_every_n_steps=1, accelerator="cpu")
    trainer.fit(Tiny(), torch.utils.data.DataLoader(Endless(), batch_size=4))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[tiny.main]")]
    assert [ln.split()[2] for ln in lines] == ["2/5", "4/5", "5/5"]  # every 2 steps and the last, no \r
    assert all("loss=" in ln for ln in lines) and "left" in lines[0] and "left" not in lines[-1]
