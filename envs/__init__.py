"""Gymnasium environments of the paper with their true dynamics as batched, differentiable torch functions.

``import envs`` registers ``diffmpc/CartPoleSwingUp-v0`` (40 steps) and ``diffmpc/MassSpringDamper-v0``
(50 steps). This package depends only on torch, numpy and gymnasium (imageio in :mod:`envs.video`).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from .cartpole_swingup import (
    CART_MASS,
    COST_WIDTH,
    DT,
    FORCE_SCALE,
    FRICTION,
    GRAVITY,
    POLE_LENGTH,
    POLE_MASS,
    SUBSTEPS,
    CartPoleSwingUpEnv,
    cartpole_cost,
    cartpole_derivatives,
    cartpole_dynamics,
    cartpole_energy,
    cartpole_tip,
)
from .mass_spring_damper import (
    MSD_Q,
    MSD_R,
    MassSpringDamperEnv,
    msd_cost,
    msd_cost_matrices,
    msd_dynamics,
    msd_matrices,
)

CARTPOLE_ID = "diffmpc/CartPoleSwingUp-v0"
MSD_ID = "diffmpc/MassSpringDamper-v0"
CARTPOLE_EPISODE_STEPS = 40
MSD_EPISODE_STEPS = 50

if CARTPOLE_ID not in registry:
    register(
        id=CARTPOLE_ID,
        entry_point="envs.cartpole_swingup:CartPoleSwingUpEnv",
        max_episode_steps=CARTPOLE_EPISODE_STEPS,
    )
if MSD_ID not in registry:
    register(
        id=MSD_ID,
        entry_point="envs.mass_spring_damper:MassSpringDamperEnv",
        max_episode_steps=MSD_EPISODE_STEPS,
    )

__all__ = [
    "CARTPOLE_ID",
    "CARTPOLE_EPISODE_STEPS",
    "CART_MASS",
    "COST_WIDTH",
    "DT",
    "FORCE_SCALE",
    "FRICTION",
    "GRAVITY",
    "MSD_EPISODE_STEPS",
    "MSD_ID",
    "MSD_Q",
    "MSD_R",
    "POLE_LENGTH",
    "POLE_MASS",
    "SUBSTEPS",
    "CartPoleSwingUpEnv",
    "MassSpringDamperEnv",
    "cartpole_cost",
    "cartpole_derivatives",
    "cartpole_dynamics",
    "cartpole_energy",
    "cartpole_tip",
    "msd_cost",
    "msd_cost_matrices",
    "msd_dynamics",
    "msd_matrices",
]
