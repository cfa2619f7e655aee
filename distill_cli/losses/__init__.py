"""Training objectives (see `base.py` for the contract)."""
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.ce import CrossEntropy
from distill_cli.losses.dkd import DKD
from distill_cli.losses.kd import KD

__all__ = ["Objective", "StepContext", "CrossEntropy", "KD", "DKD"]
