"""The experiment's configuration: typed dataclasses, YAML with dotted overrides, the README's config table.

Owns ``schema`` (the dataclasses, validated in ``__post_init__`` with messages that name the field; the derived
batch arithmetic; the metric names), ``io`` (YAML + ``train.lr=3e-5`` overrides -> ``Config``; the resolved
config written beside a run) and ``reference`` (the README's table, generated from the dataclasses).
May import: ``errors``, ``util``. Everything else imports it.
"""
