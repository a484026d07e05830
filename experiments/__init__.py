"""The lab beside the library: the demo (``python -m experiments.demo``), the DMoE final tables, tour and
studies (``python -m experiments.dmoe_report``), the paper's DMoE ablations, and the recipe sweeps.
Importable from the repository root; not shipped in the wheel. Nothing under ``src/doe_ext`` imports
from here (tests/test_layout.py)."""
