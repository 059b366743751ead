"""Sweeps: a Ray Tune Tuner over trials that each run the job's TorchTrainer, ASHA early
stopping, promotion of the best trial (`sweep`), and live progress (`progress`)."""
