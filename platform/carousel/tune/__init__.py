"""Hyperparameter search: `carousel tune` (Ray Tune over Ray Train trials, MLflow parent/child runs)."""
