"""MLflow: stores, run lifecycle, rank-0 metric logging, models and the registry."""
