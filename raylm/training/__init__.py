"""Training: the TorchTrainer and `run_train` (`trainer`), the worker recipe (`loop`), resume
(`resume`), the DeepSpeed config (`ds_config`) and evaluation (`evaluate`)."""
