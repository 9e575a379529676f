"""Pipeline stages. Each module exposes ``run(cfg, ...paths) -> result``; no Prefect, MLflow-free
except ``register``, no argument parsing. The CLI (for DVC) and the Prefect flow both call these."""
