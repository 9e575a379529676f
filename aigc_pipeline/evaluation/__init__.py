"""Sample-quality evaluation and the promotion gate, fully offline.

``inception`` finds or builds the Inception weights without any download; ``features`` runs
torch-fidelity's extractor; ``reference`` caches real-data statistics by content; ``frechet``
computes FID and its bootstrap; ``fidelity`` puts FID, KID, precision/recall and IS together;
``classifier`` scores labelled data with a classifier trained on the real data; ``progress`` is
the FID-over-training hook; ``folders`` backs ``aigc fid``; ``protocol`` names metrics after how
they were measured; ``gate`` decides promotions; ``plots`` draws charts.
"""
