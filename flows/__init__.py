"""Prefect flows: each task runs one dvc.yaml stage (see aigc_pipeline.pipeline)."""
