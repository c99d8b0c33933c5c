"""The recops operator: kopf handlers for RecModel and RecExperiment over pure manifest builders.

Layout: :mod:`~recops.operator.settings` (images, artifact store, timings, from the environment),
:mod:`~recops.operator.naming` (child names, labels, revisions), :mod:`~recops.operator.manifests`
(Kubernetes objects as pure functions of the spec), :mod:`~recops.operator.recmodel` and
:mod:`~recops.operator.recexperiment` (pure reconcile plans: what to create and what the status
becomes, from what was observed), :mod:`~recops.operator.kube` (the API calls) and
:mod:`~recops.operator.handlers` (thin kopf handlers that observe, plan and act).
"""
