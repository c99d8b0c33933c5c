"""Names shared by the Triton model repository, the router and the gates.

One place for the strings three components must agree on: the ensemble's tensor
names (what the router sends Triton) and the router's Prometheus metric names
(what the gates query). Change them here or nowhere.
"""

from __future__ import annotations

from typing import Final

# --- Triton model repository ----------------------------------------------------------
ENSEMBLE: Final = "recops_ensemble"
PREPROCESS: Final = "recops_preprocess"
RANKER: Final = "recops_ranker"
POSTPROCESS: Final = "recops_postprocess"

# Ensemble inputs. Every tensor carries Triton's batch dimension first (one row per user).
USER_ID: Final = "USER_ID"  # BYTES [1]
HISTORY: Final = "HISTORY"  # BYTES [-1]: recent item ids, oldest first; [""] means no history
K: Final = "K"  # INT32 [1]
CANDIDATES: Final = "CANDIDATES"  # BYTES [-1], optional: rank only these items instead of retrieving

# Ensemble outputs, best first.
ITEM_IDS: Final = "ITEM_IDS"  # BYTES [-1]
SCORES: Final = "SCORES"  # FP32 [-1] retrieval score (cosine / temperature + item bias)
CLICK: Final = "CLICK"  # FP32 [-1] click probability
LIKE: Final = "LIKE"  # FP32 [-1] like probability

# --- Router metrics (prometheus-client), every one labelled experiment and arm -----------
REQUESTS: Final = "recops_router_requests_total"  # + status: ok|bad_request|upstream_error|timeout|overloaded
LATENCY: Final = "recops_router_request_duration_seconds"  # histogram of /v1/recommend
ASSIGNMENTS: Final = "recops_assignments_total"  # recommend requests assigned to the arm (page views)
USERS: Final = "recops_assigned_users_total"  # distinct users, counted the first time a router sees one
IMPRESSIONS: Final = "recops_impressions_total"  # items shown
FEEDBACK: Final = "recops_feedback_events_total"  # + event: click|like|cart|purchase
PURCHASE_VALUE: Final = "recops_purchase_value_total"  # GMV
PURCHASE_VALUE_SQUARED: Final = "recops_purchase_value_squared_total"  # Σ value², for GMV-per-user variance
UPSTREAM_ERRORS: Final = "recops_upstream_errors_total"  # + kind: error|timeout

FEEDBACK_EVENTS: Final = ("click", "like", "cart", "purchase")
REQUEST_STATUSES: Final = ("ok", "bad_request", "upstream_error", "timeout", "overloaded")
