"""Carousel: deep stacked LSTM/GRU language and speech models on Ray Train + DeepSpeed + MLflow."""

__version__ = "0.1.0"
