"""Generative model families, chosen by ``train.model`` through :mod:`.registry`."""
