"""Training: the loop and its parts, each a named file.

Owns ``build`` (everything a trainer is made of, returned as a typed ``TrainParts``), ``trainer`` (the loop,
validation, selection, export), ``optim`` (AdamW parameter groups, layer-wise lr decay), ``schedule`` (warmup +
cosine; seeking it to a step), ``stop`` (preemption signals and the time budget, agreed across ranks), ``guard``
(divergence: non-finite loss, gradient or weights; the ranks' agreement), ``skips`` (undecodable samples counted
against their budget), ``ema`` (the weights that are validated and exported), ``resume`` (the run folder's lock,
a resume's config and shape, elastic resume on another world) and ``log`` (metrics.jsonl, throughput, trackers).
May import everything below it: ``embed``, ``losses``, ``model``, ``data``, ``metrics``, ``run_folder``,
``report`` (the failure gallery a run logs at its end), ``dist``, ``config``.
"""
