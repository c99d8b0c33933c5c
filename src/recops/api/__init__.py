"""Typed specs of the recops custom resources: the single source of their schemas."""

from recops.api.loading import SpecError, load_recmodel_spec, parse_recmodel_spec
from recops.api.recmodel import RecModelSpec

__all__ = ["RecModelSpec", "SpecError", "load_recmodel_spec", "parse_recmodel_spec"]
