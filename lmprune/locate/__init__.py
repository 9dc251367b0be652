"""Locate: co-activation graphs -> modules -> scores against random controls -> clusterability.

Modules: `graph` (correlation graphs), `cluster` (spectral clustering, clusterability),
`screen` (first-order screen and exact ablations against controls, on lmprune/core/ablation.py),
`plots`, `command` (LocateConfig, `locate`, the stage)."""

from lmprune.locate.command import STAGE, LocateConfig, register, run

__all__ = ["LocateConfig", "STAGE", "register", "run"]
