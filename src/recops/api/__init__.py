"""Typed specs of the recops custom resources: the single source of their schemas."""

from recops.api.loading import (
    SpecError,
    load_recexperiment_spec,
    load_recmodel_spec,
    parse_recexperiment_spec,
    parse_recmodel_spec,
)
from recops.api.recexperiment import RecExperimentSpec
from recops.api.recmodel import RecModelSpec

__all__ = [
    "RecExperimentSpec",
    "RecModelSpec",
    "SpecError",
    "load_recexperiment_spec",
    "load_recmodel_spec",
    "parse_recexperiment_spec",
    "parse_recmodel_spec",
]
