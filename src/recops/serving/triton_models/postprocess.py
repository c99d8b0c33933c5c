"""``recops_postprocess``: item indices → item ids."""

from __future__ import annotations

import numpy as np

from recops.serving import contract as c
from recops.serving import repository as r
from recops.serving.ranker import Catalog
from recops.serving.triton_models._backend import array, artifact_dir, respond


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        catalog = Catalog.load(artifact_dir(args))
        self.item_bytes = np.array([item_id.encode() for item_id in catalog.item_ids], dtype=object)

    def execute(self, requests: list) -> list:
        return [respond({c.ITEM_IDS: self.item_bytes[array(request, r.TOP_INDEX)]}) for request in requests]
