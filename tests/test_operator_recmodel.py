"""The RecModel reconciler (pure): which objects exist at each stage, what the status says, and that
planning twice is harmless. The same lifecycle runs against a real apiserver in e2e_tests/."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest

from recops.operator import recmodel
from recops.operator.manifests import recmodel as manifests
from recops.operator.manifests.common import Owner
from recops.operator.naming import child_name, training_revision
from recops.operator.settings import OperatorSettings

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
OWNER = Owner("RecModel", "ranker", "shop", "uid-1")
SETTINGS = OperatorSettings(trainer_image="registry.example/trainer:1", triton_image="registry.example/triton:1")
SPEC = {
    "data": {"source": "synthetic"},
    "backbone": {"name": "builtin:tiny-qwen2"},
    "training": {"epochs": 2, "resources": {"cpu": "4", "memory": "16Gi", "gpu": 1}},
    "serving": {"replicas": 2, "maxBatchSize": 32},
}


def observe(spec=SPEC, status=None, **children) -> recmodel.ModelObservation:
    now = children.pop("now", NOW)
    return recmodel.ModelObservation(owner=OWNER, generation=3, spec=spec, status=status or {}, now=now, **children)


def revision(spec=SPEC) -> str:
    return recmodel.revision_of(spec)


def job(state: str | None, completed: datetime = NOW, spec=SPEC) -> dict:
    conditions = [] if state is None else [{"type": state, "status": "True", "reason": "Done", "message": "m"}]
    body = {"metadata": {"name": manifests.training_job_name("ranker", revision(spec))},
            "status": {"conditions": conditions, "succeeded": 1 if state == "Complete" else 0}}
    if state == "Complete":
        body["status"]["completionTime"] = completed.strftime("%Y-%m-%dT%H:%M:%SZ")
    return body


def pod(message: str | None) -> dict:
    terminated = {"exitCode": 0, **({"message": message} if message else {})}
    return {"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}


METRICS = json.dumps({"metrics": {"recall@20": 0.31, "ndcg@10": 0.12, "click_auc": 0.7, "note": "x"}})


def deployment(spec=SPEC, available: int = 2, generation: int = 1, observed: int = 1, deadline: bool = False) -> dict:
    from recops.api import parse_recmodel_spec

    body = manifests.triton_deployment(OWNER, parse_recmodel_spec(spec), revision(spec), SETTINGS)
    body["metadata"]["generation"] = generation
    conditions = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}] if deadline else []
    body["status"] = {"observedGeneration": observed, "updatedReplicas": available, "availableReplicas": available,
                      "conditions": conditions}
    return body


def kinds(manifests_: tuple) -> list[str]:
    return [m["kind"] for m in manifests_]


def test_a_new_model_gets_its_configmap_and_training_job():
    plan = recmodel.plan(observe(), SETTINGS)
    assert kinds(plan.create) == ["ConfigMap", "Job"]
    configmap, job_ = plan.create
    assert job_["metadata"]["name"] == configmap["metadata"]["name"] == f"ranker-train-{revision()}"
    container = job_["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/trainer:1"
    assert container["args"][:3] == ["train", "--file", "/etc/recops/recmodel.yaml"]
    assert f"/artifacts/shop/ranker/{revision()}" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert {"name": "RECOPS_TERMINATION_LOG", "value": "/dev/termination-log"} in container["env"]
    owner = job_["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("RecModel", "uid-1", True)
    assert job_["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "recops-operator"
    assert "epochs: 2" in configmap["data"]["recmodel.yaml"]
    assert plan.status.phase == "Training" and plan.status.revision == revision()
    assert plan.status.observed_generation == 3
    assert [e.reason for e in plan.events] == ["TrainingStarted"]
    assert plan.apply == ()  # nothing serves yet


def test_a_running_job_is_followed_and_not_created_again():
    plan = recmodel.plan(observe(status={"phase": "Training"}, job=job(None)), SETTINGS)
    assert plan.create == () and plan.status.phase == "Training" and plan.events == ()


def test_a_failed_job_fails_the_model_with_a_warning():
    plan = recmodel.plan(observe(status={"phase": "Training"}, job=job("Failed")), SETTINGS)
    assert plan.status.phase == "Failed" and "failed" in plan.status.message
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "TrainingFailed")]
    trained = next(c for c in plan.status.conditions if c.type == "Trained")
    assert (trained.status, trained.reason) == ("False", "JobFailed")


def test_success_copies_the_metrics_and_deploys_triton():
    plan = recmodel.plan(observe(status={"phase": "Training"}, job=job("Complete"), job_pods=[pod(METRICS)]), SETTINGS)
    assert plan.status.metrics == {"recall@20": 0.31, "ndcg@10": 0.12, "click_auc": 0.7}  # numbers only
    assert plan.status.recall == 0.31
    assert plan.status.phase == "Deploying"
    assert kinds(plan.apply) == ["ConfigMap", "Deployment", "Service"]
    deployment_ = plan.apply[1]
    assert deployment_["spec"]["replicas"] == 2
    init = deployment_["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][:3] == ["export", "--revision-file", "/etc/recops/revision.json"]
    assert "--cpu" in init["args"]  # serving asks for no GPU
    # The revision and its model directory are in the ConfigMap the pods mount, not in the pod template:
    # a new revision is reloaded in place by the sidecar, in Triton's explicit model-control mode.
    assert json.loads(plan.apply[0]["data"]["revision.json"]) == {"revision": revision(),
                                                                  "model": f"/artifacts/shop/ranker/{revision()}"}
    pod_spec = deployment_["spec"]["template"]["spec"]
    triton, reloader = pod_spec["containers"]
    assert "--model-control-mode=explicit" in triton["args"]
    assert reloader["args"][:3] == ["serve", "reloader", "--watch"] and "/etc/recops/revision.json" in reloader["args"]
    assert "recops.dev/revision" not in deployment_["spec"]["template"]["metadata"]["labels"]
    assert plan.status.endpoint == "ranker-triton.shop.svc:8001"


def test_metrics_are_awaited_for_a_while_then_the_model_deploys_without_them():
    early = recmodel.plan(observe(job=job("Complete"), job_pods=[pod(None)]), SETTINGS)
    assert early.status.phase == "Training" and "waiting for the trainer's metrics" in early.status.message
    assert early.apply == ()
    late = observe(job=job("Complete", completed=NOW - timedelta(seconds=SETTINGS.metrics_grace_seconds + 1)),
                   job_pods=[pod("not json")])
    plan = recmodel.plan(late, SETTINGS)
    assert plan.status.phase == "Deploying" and plan.status.metrics is None
    assert "no metrics reported" in next(c.message for c in plan.status.conditions if c.type == "Trained")


def test_an_available_deployment_makes_the_model_ready_once():
    first = recmodel.plan(observe(status={"phase": "Deploying"}, job=job("Complete"), job_pods=[pod(METRICS)],
                                  deployment=deployment()), SETTINGS)
    assert first.status.phase == "Ready"
    assert {c.type: c.status for c in first.status.conditions} == {"Trained": "True", "Deployed": "True",
                                                                   "Ready": "True"}
    assert [e.reason for e in first.events] == ["Ready"]
    again = recmodel.plan(observe(status=first.status.to_patch(), job=job("Complete"), job_pods=[pod(METRICS)],
                                  deployment=deployment(), now=NOW + timedelta(minutes=5)), SETTINGS)
    assert again.status == first.status  # same times: nothing transitioned
    assert again.events == ()


@pytest.mark.parametrize(("kwargs", "phase"), [
    ({"available": 1}, "Deploying"),
    ({"generation": 2, "observed": 1}, "Deploying"),
    ({"deadline": True}, "Failed"),
])
def test_deployment_progress(kwargs, phase):
    plan = recmodel.plan(observe(job=job("Complete"), job_pods=[pod(METRICS)], deployment=deployment(**kwargs)),
                         SETTINGS)
    assert plan.status.phase == phase


def test_a_serving_only_change_keeps_the_revision_and_rolls_the_pods():
    changed = copy.deepcopy(SPEC)
    changed["serving"]["maxBatchSize"] = 64
    assert revision(changed) == revision()
    plan = recmodel.plan(observe(spec=changed, job=job("Complete"), job_pods=[pod(METRICS)],
                                 deployment=deployment()), SETTINGS)
    assert plan.create == ()
    assert plan.status.phase == "Deploying"  # the running pods have the old serving hash
    old = deployment()["spec"]["template"]["metadata"]["annotations"]["recops.dev/serving-hash"]
    assert plan.apply[1]["spec"]["template"]["metadata"]["annotations"]["recops.dev/serving-hash"] != old


def test_a_training_change_trains_a_new_revision_while_the_old_one_serves():
    changed = copy.deepcopy(SPEC)
    changed["training"]["epochs"] = 5
    served = revision()
    status = {"phase": "Ready", "servingRevision": served, "revision": served}
    plan = recmodel.plan(observe(spec=changed, status=status, deployment=deployment()), SETTINGS)
    assert revision(changed) != served
    assert kinds(plan.create) == ["ConfigMap", "Job"]
    assert plan.create[1]["metadata"]["name"] == f"ranker-train-{revision(changed)}"
    configmap = next(m for m in plan.apply if m["kind"] == "ConfigMap")
    assert json.loads(configmap["data"]["revision.json"])["revision"] == served
    assert plan.status.phase == "Training" and plan.status.serving_revision == served
    # Once the new revision's Job succeeded, only the ConfigMap changes: the pods reload it in place.
    trained = recmodel.plan(observe(spec=changed, status=plan.status.to_patch(), job=job("Complete", spec=changed),
                                    job_pods=[pod(METRICS)], deployment=deployment()), SETTINGS)
    configmap = next(m for m in trained.apply if m["kind"] == "ConfigMap")
    assert json.loads(configmap["data"]["revision.json"]) == {
        "revision": revision(changed), "model": f"/artifacts/shop/ranker/{revision(changed)}"}
    assert trained.status.phase == "Ready" and trained.status.serving_revision == revision(changed)
    new_template = next(m for m in trained.apply if m["kind"] == "Deployment")["spec"]["template"]
    assert new_template == deployment()["spec"]["template"]


def test_an_invalid_spec_fails_with_the_field_named_and_creates_nothing():
    bad = {**SPEC, "lora": {"r": 0}}
    plan = recmodel.plan(observe(spec=bad), SETTINGS)
    assert plan.create == () and plan.apply == ()
    assert plan.status.phase == "Failed" and "spec.lora.r" in plan.status.message
    assert [e.reason for e in plan.events] == ["InvalidSpec"]


def test_planning_is_deterministic():
    observation = observe(job=job("Complete"), job_pods=[pod(METRICS)], deployment=deployment())
    assert recmodel.plan(observation, SETTINGS) == recmodel.plan(observation, SETTINGS)


def test_revision_ignores_serving_and_sees_training():
    from recops.api import parse_recmodel_spec

    base = parse_recmodel_spec(SPEC)
    assert training_revision(base) == training_revision(parse_recmodel_spec({**SPEC, "serving": {"replicas": 9}}))
    assert training_revision(base) != training_revision(parse_recmodel_spec({**SPEC, "lora": {"r": 8}}))


def test_long_names_fit_a_dns_label():
    name = child_name("a" * 63, "train-0123456789")
    assert len(name) <= 63 and name.endswith("-train-0123456789")
    assert child_name("a" * 63, "train-0123456789") != child_name("a" * 62 + "b", "train-0123456789")


def test_settings_from_the_environment_name_a_bad_variable():
    settings = OperatorSettings.from_env({"RECOPS_TRAINER_IMAGE": "x/y:1", "RECOPS_RECONCILE_INTERVAL_SECONDS": "1.5"})
    assert settings.trainer_image == "x/y:1" and settings.reconcile_interval_seconds == 1.5
    with pytest.raises(ValueError, match="RECOPS_METRICS_GRACE_SECONDS"):
        OperatorSettings.from_env({"RECOPS_METRICS_GRACE_SECONDS": "soon"})
    with pytest.raises(ValueError, match="RECOPS_ROUTER_REPLICAS: must be positive"):
        OperatorSettings.from_env({"RECOPS_ROUTER_REPLICAS": "0"})


def test_the_operator_refuses_a_bad_setting_naming_it():
    import os
    import subprocess
    import sys

    env = {**os.environ, "RECOPS_RECONCILE_INTERVAL_SECONDS": "often"}
    done = subprocess.run([sys.executable, "-m", "recops", "operator", "--standalone"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "RECOPS_RECONCILE_INTERVAL_SECONDS: expected a number, got 'often'" in done.stdout + done.stderr


def test_recops_crds_names_an_unwritable_out_dir(tmp_path):
    from typer.testing import CliRunner

    from recops.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["crds", "--out", str(blocker / "crds")])
    assert result.exit_code != 0 and f"--out {blocker / 'crds'}" in result.output


def test_recops_export_names_a_bad_spec_file(tmp_path):
    from typer.testing import CliRunner

    from recops.cli import app

    bad = tmp_path / "spec.yaml"
    bad.write_text("data: {source: synthetic}\nlora: {r: 0}\n")
    result = CliRunner().invoke(app, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "repo"),
                                      "--spec", str(bad)])
    assert result.exit_code != 0 and "spec.lora.r" in result.output
    assert not (tmp_path / "repo").exists()  # nothing written


def test_a_two_node_model_trains_in_an_indexed_job_behind_a_headless_service():
    spec = {**SPEC, "training": {"epochs": 2, "nodes": 2, "gpusPerNode": 4}}
    plan = recmodel.plan(observe(spec=spec), SETTINGS)
    assert kinds(plan.create) == ["ConfigMap", "Service", "Job"]
    _, service, job_ = plan.create
    name = f"ranker-train-{revision(spec)}"
    assert service["metadata"]["name"] == job_["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": name}
    assert (job_["spec"]["completionMode"], job_["spec"]["completions"], job_["spec"]["parallelism"]) == (
        "Indexed", 2, 2)
    pod_spec = job_["spec"]["template"]["spec"]
    assert pod_spec["subdomain"] == name  # pods resolve as <job>-<index>.<job>
    container = pod_spec["containers"][0]
    command = container["command"]
    assert command[0] == "torchrun" and "args" not in container

    def option(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert (option("--nnodes"), option("--nproc-per-node"), option("--rdzv-backend")) == ("2", "4", "c10d")
    assert option("--rdzv-endpoint") == f"{name}-0.{name}.shop.svc:29500"
    assert command[command.index("-m") + 1 : command.index("-m") + 3] == ["recops", "train"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_one_pod_with_several_gpus_runs_torchrun_standalone():
    spec = {**SPEC, "training": {"epochs": 2, "resources": {"gpu": 2}}}
    plan = recmodel.plan(observe(spec=spec), SETTINGS)
    assert kinds(plan.create) == ["ConfigMap", "Job"]
    command = plan.create[1]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    assert "completionMode" not in plan.create[1]["spec"]


def test_adding_the_scale_out_fields_leaves_existing_revisions_alone():
    # nodes and gpusPerNode default to unset: an operator upgrade must not retrain every model.
    assert revision(SPEC) == revision({**SPEC, "training": {**SPEC["training"]}})
    from recops.api import parse_recmodel_spec

    assert "nodes" not in manifests.spec_document(OWNER, parse_recmodel_spec(SPEC))
    assert revision({**SPEC, "training": {**SPEC["training"], "nodes": 2}}) != revision(SPEC)
