"""Kill the operator (SIGKILL, no clean-up) at many points of each lifecycle and start it again:
everything it knows is in the custom resources' status, so it ends where an undisturbed operator
would, with exactly one training Job per revision and every experiment step taken once, in order."""

from __future__ import annotations

import json

import pytest
import yaml

from e2e_tests.ab import ab_test, experiment_status, finish
from e2e_tests.recops_fixtures import (
    METRICS,
    MODEL,
    get,
    job_succeeded,
    model_status,
    patch_spec,
    wait_for,
    write_termination_message,
)


def restart(operator, kills: list[str], point: str) -> None:
    """SIGKILL the operator at ``point`` and start a new one at once."""
    operator.kill()
    kills.append(point)
    operator.start()


def jobs_of(cluster, namespace: str) -> list[str]:
    items = cluster.kubectl.json("get", "jobs", "-n", namespace, "-l", "app.kubernetes.io/instance=ranker")["items"]
    return sorted(job["metadata"]["name"] for job in items)


def test_recmodel_lifecycle_survives_restarts_at_every_stage(cluster, namespace, artifacts, operator):
    kills: list[str] = []
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(MODEL))
    restart(operator, kills, "just after apply")
    revision = wait_for(lambda: model_status(cluster, namespace).get("revision"), "a revision")
    restart(operator, kills, "revision in status")
    job = f"ranker-train-{revision}"
    wait_for(lambda: get(cluster, "job", job, namespace), f"Job {job}")
    restart(operator, kills, "Job created")
    wait_for(lambda: job_succeeded(cluster, namespace, job), "the Job to succeed")
    restart(operator, kills, "Job succeeded, no metrics yet")
    write_termination_message(cluster, namespace, job, METRICS)
    restart(operator, kills, "metrics written")
    wait_for(lambda: model_status(cluster, namespace).get("phase") in ("Deploying", "Ready"), "Deploying")
    restart(operator, kills, "Deploying")
    wait_for(lambda: model_status(cluster, namespace).get("phase") == "Ready", "Ready", timeout=90)
    restart(operator, kills, "Ready")
    first = model_status(cluster, namespace)

    patch_spec(cluster, namespace, "ranker", {"serving": {"replicas": 2}})
    restart(operator, kills, "serving change applied")
    wait_for(
        lambda: get(cluster, "deployment", "ranker-triton", namespace)["status"].get("availableReplicas") == 2,
        "two replicas",
    )
    patch_spec(cluster, namespace, "ranker", {"training": {"epochs": 4}})
    restart(operator, kills, "training change applied")
    second = wait_for(
        lambda: (s := model_status(cluster, namespace)).get("revision") != revision and s, "the second revision"
    )
    wait_for(lambda: get(cluster, "job", second["trainingJob"], namespace), "the second Job")
    restart(operator, kills, "second Job created")
    wait_for(lambda: job_succeeded(cluster, namespace, second["trainingJob"]), "the second Job to succeed")
    write_termination_message(cluster, namespace, second["trainingJob"], METRICS)
    restart(operator, kills, "second metrics written")
    final = wait_for(
        lambda: (
            (s := model_status(cluster, namespace)).get("phase") == "Ready"
            and s.get("servingRevision") == second["revision"]
            and s
        ),
        "Ready on the second revision",
        timeout=90,
    )

    assert len(kills) >= 10, kills
    assert jobs_of(cluster, namespace) == sorted([first["trainingJob"], second["trainingJob"]])
    assert final["metrics"] == first["metrics"] and final["endpoint"] == first["endpoint"]
    deployment = get(cluster, "deployment", "ranker-triton", namespace)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["labels"]["recops.dev/revision"] == second["revision"]
    served = get(cluster, "configmap", "ranker-triton", namespace)["data"]["revision.json"]
    assert json.loads(served)["revision"] == second["revision"]  # what the pods' reloader follows


@pytest.mark.slow
def test_recexperiment_survives_restarts_at_every_stage(cluster, namespace, artifacts, operator, stack):
    kills: list[str] = []
    name = "restarted"
    terminal = ("Promoted", "RolledBack", "Failed")
    with ab_test(cluster, namespace, stack, name):
        restart(operator, kills, "experiment applied, router up")
        looks_seen: list[float] = []
        while (status := experiment_status(cluster, namespace, name)).get("phase") not in terminal:
            last = status.get("rollout", {}).get("lastLookAt")
            if last is not None and last not in looks_seen:
                looks_seen.append(last)
                restart(operator, kills, f"step {status['currentStep']}, after look {len(looks_seen)}")
            wait_for(
                lambda: (
                    (s := experiment_status(cluster, namespace, name)).get("phase") in terminal
                    or s.get("rollout", {}).get("lastLookAt") not in (None, *looks_seen)
                ),
                "the next look",
                timeout=60,
                interval=0.3,
            )
        status = finish(cluster, namespace, name)
    # How many looks a step takes depends on the traffic the gates see, so count steps, not looks:
    # the operator was killed after a look in every step before the last (the last may decide at
    # its first look, which ends the experiment).
    interrupted_steps = {int(point.split()[1].rstrip(",")) for point in kills[1:]}
    assert interrupted_steps >= {0, 1}, kills
    assert status["phase"] == "Promoted", status.get("message")
    steps = [entry["step"] for entry in status["rollout"]["history"] if entry["decision"] in ("Start", "Advance")]
    assert steps == [0, 1, 2]  # none skipped, none repeated
