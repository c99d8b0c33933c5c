"""Two operator replicas: kopf peering lets only the higher priority work; the other takes over when
it dies (the Deployment of the Helm chart runs two for this)."""

from __future__ import annotations

import copy

import yaml

from e2e_tests.recops_fixtures import MODEL, OperatorProcess, get, model_status, wait_for


def apply_model(cluster, namespace: str, name: str) -> None:
    manifest = copy.deepcopy(MODEL)
    manifest["metadata"]["name"] = name
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def paused(log: str) -> bool:
    """kopf starts paused; a replica that saw no higher peer yet may resume, then pause again."""
    return log.rfind("Pausing operations") >= log.rfind("Resuming operations")


def test_the_higher_priority_replica_works_and_the_other_takes_over(cluster, apply_crds, namespace, tmp_path):
    env = {"RECOPS_PEERING_LIFETIME_SECONDS": "4"}
    leader = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "leader.log", env, peering_priority=100)
    standby = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "standby.log", env, peering_priority=10)
    try:
        leader.start()
        standby.start()
        # kopf starts paused and resumes once the peering shows no live replica above it.
        wait_for(lambda: "Resuming operations" in leader.log.read_text(), "the leader to start working", timeout=60)
        peering = wait_for(lambda: len((p := cluster.kubectl.json("get", "kopfpeerings.kopf.dev", "recops", "-n",
                                                                  namespace)).get("status", {})) == 2 and p,
                           "both replicas in the peering")
        assert sorted(peer["priority"] for peer in peering["status"].values()) == [10, 100]
        wait_for(lambda: paused(standby.log.read_text()), "the standby to pause")

        apply_model(cluster, namespace, "first")
        job = wait_for(lambda: model_status(cluster, namespace, "first").get("trainingJob"), "the first Job")
        get(cluster, "job", job, namespace)
        assert "Handler 'recmodel_changed' succeeded" in leader.log.read_text()
        assert "recmodel_changed" not in standby.log.read_text()
        assert paused(standby.log.read_text())

        leader.kill()
        wait_for(lambda: "Resuming operations" in standby.log.read_text(), "the standby to take over", timeout=60)
        apply_model(cluster, namespace, "second")
        wait_for(lambda: model_status(cluster, namespace, "second").get("trainingJob"), "the second Job")
        assert "Handler 'recmodel_changed' succeeded" in standby.log.read_text()
        standby.check_alive()
    finally:
        leader.stop()
        standby.stop()
