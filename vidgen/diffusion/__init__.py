"""Rectified flow objective and samplers."""

from .flow import (
    FlowOptions,
    flow_loss,
    interpolate,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    token_flow_loss,
    velocity_target,
)
from .sampling import (
    SAMPLERS,
    SOLVERS,
    cfg_model_fn,
    i2v_cfg_model_fn,
    sample_euler,
    sample_heun,
    sample_unipc,
    timesteps_schedule,
)

__all__ = [
    "FlowOptions",
    "SAMPLERS",
    "SOLVERS",
    "cfg_model_fn",
    "i2v_cfg_model_fn",
    "flow_loss",
    "token_flow_loss",
    "interpolate",
    "resolution_shift",
    "sample_euler",
    "sample_heun",
    "sample_unipc",
    "sample_timesteps",
    "shift_timesteps",
    "timesteps_schedule",
    "velocity_target",
]
