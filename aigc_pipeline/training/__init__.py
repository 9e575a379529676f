"""The training loop and its checkpoints. Imports torch only: no Prefect, MLflow or DVC, so it
runs as-is on a bare GPU machine."""
