"""The HTML report of a run, and the analysis behind it.

Owns ``build`` (gathers a run's metrics, curves, galleries into one self-contained page), ``analysis`` (what
explains the numbers: the failure gallery, the Recall@K curve, super classes, score histograms, thumbnails read
from the shards), ``html`` (renders) and ``plots`` (matplotlib figures).
May import: ``embed.embeddings``, ``knn``, ``run_folder``, ``config``, ``errors``. The trainer imports
``analysis`` for the failure gallery it logs at the end of a run.
"""
