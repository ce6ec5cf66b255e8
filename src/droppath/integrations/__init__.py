"""Drop-rate schedules inside training frameworks: PyTorch Lightning
(``droppath.integrations.lightning``) and the Hugging Face ``Trainer``
(``droppath.integrations.transformers``). Each module imports its framework when imported."""
