"""Everything MLflow, one module per consumer, so that a stage's code (dvc.yaml's deps, the
training checkpoint's fingerprint) is only what that stage runs: editing the registry, the UI link
or a comparison never re-runs training.

- ``store``: where the store is, ``connect`` (everyone);
- ``tags``: a run's tags and dataset inputs, where it trained, its sweep parent (train, record);
- ``run``: the train stage's run, one log call per epoch (train, record);
- ``record``: complete or rebuild the run of a pipeline result (the ``record`` stage);
- ``models``: the MLflow model each complete run carries (record; its tag: the registry);
- ``queries``: finished runs as a DataFrame, metric histories, artifacts (compare, register);
- ``comparison``: a comparison's report and figures as a run (compare);
- ``sweeps``: a sweep's parent run (``make sweep``, compare);
- ``registry``: the best run's model as ``vaelab-vae@champion`` (register);
- ``ui``: ``make ui`` and its link.

This file imports nothing: importing any of them runs it, and it must not pull in the others.
See docs/tracking.md for the design.
"""
