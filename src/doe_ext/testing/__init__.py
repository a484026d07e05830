"""Ablations from pytest (docs/design.md#ablations): the recorder, its statistics and the pytest plugin
(:mod:`doe_ext_pytest`, loaded by pytest through the ``pytest11`` entry point)."""
from doe_ext.testing.recorder import Ablation, Claim
from doe_ext.testing.stats import Interval, mean_ci, paired_difference, verdict

__all__ = ["Ablation", "Claim", "Interval", "mean_ci", "paired_difference", "verdict"]
