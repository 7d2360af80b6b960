"""Applications built on the core, kept out of it: dataset tools.

:mod:`segloss_core.datasets.distmap` precomputes a dataset's distance maps (``segloss distmap``)
and crops patches of them for training.
"""
