"""Configuration of the shadow model (`[model.shadow]`): a candidate classifier that runs
beside the live one on a share of the frames, on the same crops, and is only compared,
never published. Pure validation; the runner is monitor.shadow.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from monitor.config.durations import Duration


class ShadowConfig(BaseModel):
    """A candidate model evaluated on live crops before it is promoted (docs/model-promotion.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="The candidate's exported model directory.")
    share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Share of the classified frames (each one micro-batch of crops) the "
        "candidate also classifies; 1 = every frame.",
    )
    window: Duration = Field(
        default=300.0,
        ge=10,
        description="Length of the windows the comparison is recorded in.",
    )
    queue_size: int = Field(
        default=64,
        ge=1,
        description="Frames waiting for the candidate; when it falls behind, further frames "
        "are left out of the comparison and counted (shadow_frames_skipped), never the frame "
        "itself.",
    )
