"""Datasets: source readers (a registry), normalisation and the prepared on-disk format."""
