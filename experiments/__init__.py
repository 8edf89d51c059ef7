"""Quality reproduction of the FoRA claims: a config-driven runner (``run.py``), the methods
(``methods.py``), tasks and models (``tasks.py``, ``models.py``), update metrics (``metrics.py``)
and the aggregator (``aggregate.py``). See ``docs/results.md``."""
