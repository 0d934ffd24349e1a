"""Agents: the differentiable MPC policy, the cart-pole sampling expert and its dataset, imitation learners
(IfO through the MPC layer, BC) and their evaluation.

Names are imported lazily (``agents.MPCPolicy`` loads :mod:`agents.mpc_policy` on first use), so importing one
agent never pulls in the others' dependencies.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MPCPolicy": "mpc_policy",
    "ExpertConfig": "expert", "SamplingExpert": "expert", "evaluate_expert": "expert",
    "run_episode": "expert",
    "ExpertDataset": "dataset", "DatasetError": "dataset", "generate_dataset": "dataset",
    "load_dataset": "dataset", "save_dataset": "dataset",
    "IfOConfig": "ifo", "IfOTrainer": "ifo", "IFO_PRESETS": "ifo",
    "BCConfig": "bc", "BCPolicy": "bc", "BCTrainer": "bc",
    "evaluate_policy": "evaluation", "expert_policy": "evaluation", "mpc_policy": "evaluation",
    "rollout": "evaluation", "start_states": "evaluation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
