"""DropRateCallback with the real PyTorch Lightning Trainer and Hugging Face Trainer."""

import pytest
import torch
from torch import nn

from conftest import require
from droppath import DropRateScheduler, Residual


def _blocks():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), *[Residual(nn.Linear(8, 8)) for _ in range(3)], nn.Linear(8, 1)
    )


def _expected(steps, **options):
    sched = DropRateScheduler(_blocks(), 0.4, **options)
    return [sched.rates_at(k) for k in range(steps)]


OPTIONS = {"time_rule": "warmup", "warmup_steps": 6}


def test_lightning_steps_logs_and_resumes(tmp_path):
    pl = require("lightning.pytorch")
    from droppath.integrations.lightning import DropRateCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _blocks()
            self.seen = []  # (optimizer step, rates) at every training batch

        def training_step(self, batch, batch_idx):
            self.seen.append((self.trainer.global_step, [b.p for b in self.net[1:4]]))
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
            return torch.utils.data.DataLoader(data, batch_size=4)

    def trainer(steps, **kw):
        logger = pl.loggers.CSVLogger(tmp_path, name="logs")
        return pl.Trainer(
            max_steps=steps,
            accumulate_grad_batches=2,
            logger=logger,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            **kw,
        )

    module, callback = Module(), DropRateCallback(0.4, **OPTIONS)
    first = trainer(4, callbacks=[callback])
    first.fit(module)
    expected = _expected(8, **OPTIONS)
    assert [s for s, _ in module.seen] == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 batches per optimizer step
    for step, rates in module.seen:
        assert rates == expected[step]
    assert callback.scheduler.last_step == 3
    logged = (tmp_path / "logs").rglob("metrics.csv")
    header = next(logged).read_text().splitlines()[0]
    assert "drop_rate/net.1" in header and "drop_rate/net.3" in header
    ckpt = tmp_path / "step4.ckpt"
    first.save_checkpoint(ckpt)

    resumed_module, resumed_callback = Module(), DropRateCallback(0.4, **OPTIONS)
    trainer(6, callbacks=[resumed_callback]).fit(resumed_module, ckpt_path=ckpt)
    assert [s for s, _ in resumed_module.seen] == [4, 4, 5, 5]
    for step, rates in resumed_module.seen:
        assert rates == expected[step]


def test_transformers_trainer_steps_logs_and_resumes(tmp_path):
    tf = require("transformers")
    require("accelerate")
    from droppath.integrations.transformers import DropRateCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _blocks()
            self.seen = []

        def forward(self, x, labels):
            self.seen.append([b.p for b in self.net[1:4]])
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=g), "labels": torch.randn(1, generator=g)}

    def trainer(model, steps, callback):
        args = tf.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            logging_steps=1,
            save_steps=4,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=0.01,
        )
        return tf.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])

    expected = _expected(8, **OPTIONS)
    model, callback = Model(), DropRateCallback(0.4, **OPTIONS)
    first = trainer(model, 4, callback)
    first.train()
    assert model.seen == [expected[k] for k in (0, 0, 1, 1, 2, 2, 3, 3)]
    logged = [h for h in first.state.log_history if "drop_rate/net.1" in h]
    assert logged and logged[0]["drop_rate/net.3"] == expected[0][2]

    resumed = Model()
    trainer(resumed, 6, DropRateCallback(0.4, **OPTIONS)).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-4")
    )
    assert resumed.seen == [expected[k] for k in (4, 4, 5, 5)]


def test_lightning_module_that_converts_its_model_after_the_callback_started(tmp_path):
    # The callback builds its scheduler in on_fit_start, before the module's own on_fit_start,
    # where this module swaps timm's drop paths for droppath's (accelerate does the same).
    pl = require("lightning.pytorch")
    timm_layers = require("timm.layers")
    from droppath import convert, drop_path_sites
    from droppath.integrations.lightning import DropRateCallback

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.fc, self.drop_path = nn.Linear(8, 8), timm_layers.DropPath(p)

        def forward(self, x):
            return x + self.drop_path(self.fc(x))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(4, 8), *[Block(p) for p in (0.1, 0.2)], nn.Linear(8, 1)
            )
            self.seen = []

        def on_fit_start(self):
            convert(self.net)

        def training_step(self, batch, batch_idx):
            self.seen.append([s.p for _, s in drop_path_sites(self.net)])
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
            return torch.utils.data.DataLoader(data, batch_size=4)

    module, callback = Module(), DropRateCallback(0.4, time_rule="warmup", warmup_steps=2)
    pl.Trainer(
        max_steps=3,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
    ).fit(module)
    assert module.seen == [[0.0, 0.0], [0.1, 0.2], [0.2, 0.4]]  # the profile 1:2, warmed up
    rows = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    column = rows[0].split(",").index("drop_rate/net.2.drop_path")
    logged = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert logged == pytest.approx([0.0, 0.2, 0.4])
