"""Quality reproduction of the FoRA claims: a config-driven runner (``run.py``) over the plan of
a config (``protocol.py``), the methods (``methods.py``), tasks and models (``tasks.py``,
``models.py``, and ``classifier.py`` for encoders with a classifier head), scoring
(``evaluation.py``), update metrics (``metrics.py``) and the aggregator (``aggregate.py``).
See ``docs/results.md``."""
