"""Parts of ``benchmarks/quality.py``: tasks (data), methods (model builders), the protocol of
one cell (LR sweep, then seeds), the cost model and the report."""
