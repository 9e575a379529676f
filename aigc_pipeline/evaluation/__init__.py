"""Sample-quality evaluation (FID, KID, precision/recall, IS) with torch-fidelity, fully offline.

``inception`` finds or builds the Inception weights without any download, ``fidelity`` runs
torch-fidelity on in-memory uint8 image arrays with a content-keyed statistics cache.
"""
