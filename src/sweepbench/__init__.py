"""sweepbench: Optuna studies, device x precision benchmarks and MLflow reports over one PyTorch engine."""

__version__ = "0.1.0"
