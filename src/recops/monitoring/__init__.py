"""Optional monitoring: the Grafana dashboard and the Prometheus alerting rules, as pure functions.

* :mod:`recops.monitoring.dashboard` builds the dashboard's JSON model with grafana-foundation-sdk.
* :mod:`recops.monitoring.alerts` builds the PrometheusRule's rule groups.
* :mod:`recops.monitoring.render` writes both where the Helm chart reads them
  (``python -m recops.monitoring.render --out helm/recops/files``).
"""
