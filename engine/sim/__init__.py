"""Discrete-event simulator: the real scheduler core on a virtual clock with a cost model."""

from engine.sim.cost import CostModel
from engine.sim.simulator import SimResult, simulate

__all__ = ["CostModel", "SimResult", "simulate"]
