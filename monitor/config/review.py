"""Configuration of the review queue (the `[review]` section): which classified crops
the daemon keeps for an operator to label, and how many.

Pure validation; the queue itself is monitor.review.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PerHourCaps(BaseModel):
    """At most this many crops kept per clock hour for each reason, so one bad hour (a
    fouled window makes every crop out of distribution) cannot fill the store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uncertain: int = Field(default=120, ge=0, description="Crops below the confidence threshold.")
    out_of_distribution: int = Field(
        default=60, ge=0, description="Crops the model's OOD score rejected."
    )
    boundary: int = Field(
        default=60,
        ge=0,
        description="Certain crops whose top two class probabilities lie within "
        "review.boundary_margin of each other.",
    )
    random: int = Field(
        default=60,
        ge=0,
        description="The stratified random share of the rest, split evenly over the classes "
        "the model called (each class gets its part of the cap).",
    )


class ReviewConfig(BaseModel):
    """The review queue: crops kept under <daemon.state_dir>/samples for labelling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True, description="Keep crops for review and serve the labelling page (/label)."
    )
    max_samples: int = Field(
        default=5000,
        ge=10,
        description="Crops the store holds at most; beyond it the oldest unlabelled crop goes "
        "first, a labelled one only when nothing unlabelled is left.",
    )
    boundary_margin: float = Field(
        default=0.15,
        gt=0,
        lt=1,
        description="A certain crop whose top two probabilities differ by less than this is "
        "kept as 'boundary'.",
    )
    random_share: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Share of the remaining certain crops drawn at random (stratified by the "
        "class the model called), up to per_hour.random.",
    )
    per_hour: PerHourCaps = Field(
        default_factory=PerHourCaps, description="Crops kept per hour for each reason, at most."
    )
    queue_size: int = Field(
        default=512,
        ge=1,
        description="Kept crops waiting to be written; when the disk falls behind, further "
        "crops are dropped and counted (review_samples_dropped), never the frame.",
    )
