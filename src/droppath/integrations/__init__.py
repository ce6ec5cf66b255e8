"""Drop-rate schedules inside training frameworks: PyTorch Lightning
(:mod:`droppath.integrations.lightning`) and the Hugging Face ``Trainer``
(:mod:`droppath.integrations.transformers`). Each module imports its framework when imported."""
