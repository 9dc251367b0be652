"""Induce: gradient routing of offensive text into designated MLP neurons, so that pruning
them removes it; a held-out probe of the designated module against random sets (`command`)."""

from lmprune.induce.command import STAGE, InduceConfig, register, run

__all__ = ["InduceConfig", "STAGE", "register", "run"]
