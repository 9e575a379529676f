"""aigc-pipeline."""
