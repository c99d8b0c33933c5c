"""Hot reload of a new model revision into a live Triton (explicit model control), with the real server.

Two revisions trained on different data answer differently, so every response can be told apart:
under continuous load a switch drops no request and never mixes revisions; a revision whose ranker
does not load leaves the previous one serving and names the model; the ``recops serve reloader``
sidecar follows its watch file and survives bad content.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from recops.api.recmodel import ServingSpec
from recops.serving import contract as c
from recops.serving.hot_reload import (
    Reloader,
    ReloadError,
    TritonControl,
    WatchFileError,
    hot_reload,
    parse_watch_file,
    plan_reload,
)
from recops.serving.ranker import Ranker
from recops.serving.repository import (
    STEP_FOLDER,
    StepNames,
    build_repository,
    check_model,
    ensemble_steps,
    model_configs,
    read_config,
    revision_suffix,
)
from recops.serving.triton_client import parse_answer, request_inputs
from recops.serving.triton_server import TritonServer

SERVING = ServingSpec.model_validate({"maxBatchSize": 16, "maxQueueDelayMicroseconds": 2000})


# --- pure parts: names, configs, plans, the watch file ------------------------------------------


def test_revision_suffixes_are_model_name_safe_and_distinct():
    assert revision_suffix("rev-3") == "rev-3"
    assert revision_suffix("a_b") == "a_b"
    dotted, underscored = revision_suffix("v1.0"), revision_suffix("v1_0")
    assert dotted != underscored and dotted.startswith("v1_0_")  # a hash keeps them apart
    assert STEP_FOLDER.match(f"{c.RANKER}_{revision_suffix('ns/name@sha256:ab+cd')}")
    assert len(revision_suffix("x" * 300)) <= 64
    with pytest.raises(ValueError, match="non-empty"):
        revision_suffix(" ")


def test_configs_name_the_revision_steps_and_their_artifact():
    configs = model_configs(SERVING, history_length=20, revision="r7")
    steps = StepNames.for_revision("r7")
    assert set(configs) == {c.ENSEMBLE, *steps.all}
    assert ensemble_steps(configs[c.ENSEMBLE]) == steps
    for name in steps.all:
        assert configs[name].name == name
        assert configs[name].parameters["artifact"].string_value == f"{c.RANKER}_r7/1/artifact"
    assert steps.revision == "r7" and StepNames.for_revision(None).revision is None


def test_the_plan_loads_the_new_steps_switches_once_then_retires_the_old_and_leftovers():
    old, new = StepNames.for_revision("a"), StepNames.for_revision("b")
    folders = [c.ENSEMBLE, *old.all, *new.all, f"{c.RANKER}_zombie", "unrelated_model"]
    plan = plan_reload(old, new, SERVING, folders)
    assert plan.operations() == [
        ("load", new.ranker), ("load", new.preprocess), ("load", new.postprocess),
        ("switch", c.ENSEMBLE),
        *(("unload", name) for name in (*old.all, f"{c.RANKER}_zombie")),
        *(("delete", name) for name in (*old.all, f"{c.RANKER}_zombie")),
    ]
    assert ensemble_steps(plan.ensemble) == new
    assert plan_reload(None, new, SERVING).retire == ()  # a first load retires nothing
    with pytest.raises(ValueError, match="already serving"):
        plan_reload(new, new, SERVING)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model": "/m"}', "missing key 'revision'"),
        ('{"revision": "r1"}', "missing key 'model'"),
        ('{"revision": "", "model": "/m"}', "'revision' must be a non-empty string"),
        ('{"revision": "r1", "model": 3}', "'model' must be a non-empty string"),
    ],
)
def test_bad_watch_file_content_is_named(text, message):
    with pytest.raises(WatchFileError, match=message):
        parse_watch_file(text)


def test_watch_file_format():
    target = parse_watch_file('{"revision": "r2", "model": "/artifacts/ns/m/r2", "note": "ignored"}')
    assert (target.revision, target.model) == ("r2", Path("/artifacts/ns/m/r2"))


@pytest.mark.slow
def test_export_with_a_revision_writes_revision_named_steps(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from recops.cli import app

    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_model[2]), "--out", str(out), "--revision", "v1.0"])
    assert result.exit_code == 0, result.output
    steps = StepNames.for_revision("v1.0")
    assert sorted(p.name for p in out.iterdir()) == sorted([c.ENSEMBLE, *steps.all])
    assert ensemble_steps(read_config(out / c.ENSEMBLE / "config.pbtxt")) == steps
    assert (out / steps.artifact / "towers.safetensors").is_file()
    assert "triton_models.ranker" in (out / steps.ranker / "1" / "model.py").read_text()

    # The pods' init container: model and revision from the reloader's file.
    revision_file = tmp_path / "revision.json"
    revision_file.write_text(json.dumps({"revision": "r9", "model": str(tiny_model[2])}))
    result = CliRunner().invoke(app, ["export", "--revision-file", str(revision_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ensemble_steps(read_config(out / c.ENSEMBLE / "config.pbtxt")) == StepNames.for_revision("r9")
    assert not (out / steps.ranker).exists()  # the repository was replaced
    revision_file.write_text('{"revision": "r9"}')
    result = CliRunner().invoke(app, ["export", "--revision-file", str(revision_file), "--out", str(out)])
    assert result.exit_code == 2 and "missing key 'model'" in result.output


# --- the real server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """Another tiny model: other synthetic data and seed, so its answers differ from ``tiny_model``'s."""
    from recops.api.recmodel import RecModelSpec
    from recops.data.prepare import prepare
    from recops.training.export import export_model
    from recops.training.trainer import train

    spec = RecModelSpec.model_validate({
        "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 9}},
        "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
        "lora": {"r": 4, "alpha": 8},
        "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8, "seed": 5},
        "serving": {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 2000},
    })
    data = prepare(spec.data)
    folder = tmp_path_factory.mktemp("second-model")
    result = train(spec, data, folder / "checkpoints")
    export_model(result.model, spec, data, folder / "model")
    return folder / "model"


@dataclass
class Live:
    """A Triton in explicit mode over a revisioned repository, and what it serves now."""

    server: TritonServer
    repository: Path
    control: TritonControl
    model: Path  # the exported model behind the serving revision

    def switch(self, model: Path, revision: str):
        result = hot_reload(self.repository, check_model(model), revision, self.control)
        self.model = model
        return result


_revisions = count(1)


def _fresh(prefix: str) -> str:
    return f"{prefix}{next(_revisions)}"


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    repository = build_repository(tiny_model[2], tmp_path_factory.mktemp("live") / "repo", revision="a0")
    server = TritonServer(repository, explicit_models=(c.ENSEMBLE,))
    server.start(timeout=180)
    control = TritonControl(server.http_url)
    try:
        yield Live(server, repository, control, tiny_model[2])
    finally:
        control.close()
        server.close()


@pytest.fixture(scope="module")
def answers(tiny_model, second_model):
    """Requests both revisions accept, and each revision's in-process answer to them."""
    first, second = Ranker.load(tiny_model[2]), Ranker.load(second_model)
    shared = [i for i in first.catalog.item_ids if i in set(second.catalog.item_ids)]
    requests = [(shared[i : i + 1 + i % 4], 5) for i in range(0, 24, 3)]
    expected = {
        model: [ranker.recommend([history], k=k)[0] for history, k in requests]
        for model, ranker in ((tiny_model[2], first), (second_model, second))
    }
    (a, b) = expected.values()
    assert all(x.item_ids != y.item_ids or not np.allclose(x.scores, y.scores) for x, y in zip(a, b, strict=True))
    return requests, expected


def _which(answer, row: int, expected: dict) -> Path | None:
    """The model whose in-process answer this response is (all of it), or None for a mix or a stranger."""
    for model, rows in expected.items():
        want = rows[row]
        if answer.item_ids == want.item_ids and all(
            np.allclose(getattr(answer, name), getattr(want, name), atol=1e-5, rtol=0)
            for name in ("scores", "click", "like")
        ):
            return model
    return None


def _ask(client, request) -> object:
    history, k = request
    return parse_answer(client.infer(c.ENSEMBLE, request_inputs(triton_grpc, "u1", history, k)))


def _serving(live: Live, answers) -> Path | None:
    requests, expected = answers
    client = triton_grpc.InferenceServerClient(live.server.grpc_url)
    found = {_which(_ask(client, request), row, expected) for row, request in enumerate(requests)}
    assert len(found) == 1, found
    return found.pop()


def _index(live: Live) -> dict[str, str]:
    return {entry["name"]: entry.get("state", "") for entry in live.control.index()}


@pytest.mark.slow
def test_explicit_mode_loads_the_ensemble_and_the_steps_it_names(live, answers):
    assert _serving(live, answers) == live.model
    index = _index(live)
    steps = live.control.serving_steps()
    assert steps is not None and all(index[name] == "READY" for name in (c.ENSEMBLE, *steps.all))


@pytest.mark.slow
def test_a_reload_under_load_drops_nothing_and_never_mixes_revisions(live, answers, tiny_model, second_model):
    requests, expected = answers
    if live.model != tiny_model[2]:
        live.switch(tiny_model[2], _fresh("a"))
    old_steps = live.control.serving_steps()
    log: list[tuple[float, float, int, object]] = []  # (start, end, row, answer or exception)
    stop = threading.Event()

    def client_loop(offset: int) -> None:
        client = triton_grpc.InferenceServerClient(live.server.grpc_url)
        for n in count(offset):
            if stop.is_set():
                return
            row = n % len(requests)
            start = time.monotonic()
            try:
                outcome: object = _ask(client, requests[row])
            except Exception as error:  # any failure is a dropped request
                outcome = error
            log.append((start, time.monotonic(), row, outcome))

    model_ready: list[int] = []  # the ensemble's readiness (the pods' readiness probe) all along

    def probe_loop() -> None:
        url = f"http://{live.server.http_url}/v2/models/{c.ENSEMBLE}/ready"
        while not stop.is_set():
            try:
                model_ready.append(urllib.request.urlopen(url, timeout=5).status)
            except urllib.error.HTTPError as error:
                model_ready.append(error.code)
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=probe_loop))
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        began = time.monotonic()
        result = live.switch(second_model, _fresh("b"))
        ended = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    failures = [outcome for *_, outcome in log if isinstance(outcome, Exception)]
    assert failures == [], [str(failure) for failure in failures[:3]]
    served = [(start, end, _which(outcome, row, expected)) for start, end, row, outcome in log]
    assert all(model is not None for *_, model in served), "a response was neither revision's: mixed"
    assert all(model == second_model for start, _, model in served if start > ended)
    during = [model for start, end, model in served if end > began and start < ended]
    # In flight when the ensemble switched: they finished on R1's steps while R1 was being unloaded.
    straddling = [model for start, end, model in served if start < result.switched_at < end]
    assert {tiny_model[2], second_model} <= {model for *_, model in served}
    latency = sorted(end - start for start, end, _ in served if end > began and start < ended)
    print(
        f"\nreload {result.seconds['total']:.1f} s (load {result.seconds['prepare']:.1f} s, switch "
        f"{1000 * result.seconds['switch']:.1f} ms, retire {1000 * result.seconds['retire']:.0f} ms); "
        f"{len(log)} requests, {len(during)} during the reload ({len(straddling)} in flight at the switch), "
        f"{len(failures)} failed; latency during the reload p50 {1000 * latency[len(latency) // 2]:.0f} ms, "
        f"max {1000 * latency[-1]:.0f} ms"
    )
    assert len(during) > 10 and straddling  # the load really ran through the reload and the switch
    assert model_ready and set(model_ready) == {200}
    index = _index(live)
    assert not set(old_steps.all) & set(index), index  # R1's steps unloaded and their folders gone
    assert not any((live.repository / name).exists() for name in old_steps.all)
    assert all(index[name] == "READY" for name in (c.ENSEMBLE, *result.target.all))
    on_disk = ensemble_steps(read_config(live.repository / c.ENSEMBLE / "config.pbtxt"))
    assert on_disk == result.target  # a restarted Triton comes up on the new revision
    triton_log = live.server.log_path.read_text(errors="replace")
    for name in result.target.all:  # the switch reused the loaded steps instead of loading them again
        assert triton_log.count(f'"loading: {name}:1"') == 1, name


@pytest.mark.slow
def test_a_ranker_that_does_not_load_leaves_the_serving_revision(live, answers, tiny_model, second_model, tmp_path):
    import shutil

    other = second_model if live.model == tiny_model[2] else tiny_model[2]
    broken = shutil.copytree(other, tmp_path / "broken")
    (broken / "towers.safetensors").write_bytes(b"not a safetensors file")
    before = live.control.serving_steps()
    with pytest.raises(ReloadError) as failed:
        live.switch(broken, "broken")
    assert failed.value.model == StepNames.for_revision("broken").ranker
    assert failed.value.reason and f"{failed.value.model} failed to load" in str(failed.value)
    assert live.control.serving_steps() == before
    assert _serving(live, answers) == live.model
    assert not any("broken" in name for name in _index(live))
    assert not any("broken" in p.name for p in live.repository.iterdir())


def _configmap(folder: Path, content: str) -> Path:
    """Write the watch file as a ConfigMap volume does: a new timestamped folder, then an atomic ``..data`` swap."""
    folder.mkdir(exist_ok=True)
    version = folder / f"..{time.time_ns()}"
    version.mkdir()
    (version / "reload.json").write_text(content)
    link = folder / "..data_tmp"
    link.symlink_to(version.name)
    os.replace(link, folder / "..data")
    watch = folder / "reload.json"
    if not watch.is_symlink():
        watch.symlink_to("..data/reload.json")
    return watch


def _wait_for(stream_lines: list[str], text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(stream_lines):
            if text in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged in {timeout:.0f} s:\n" + "".join(stream_lines[-20:]))


@pytest.mark.slow
def test_the_reloader_follows_its_watch_file_and_outlives_bad_input(live, answers, tiny_model, second_model, tmp_path):
    serving_now = live.control.serving_steps()
    target = second_model if live.model == tiny_model[2] else tiny_model[2]
    watch = _configmap(tmp_path / "config", json.dumps({"revision": serving_now.revision, "model": str(live.model)}))
    command = [
        sys.executable, "-m", "recops", "serve", "reloader", "--watch", str(watch),
        "--model-repository", str(live.repository), "--triton-url", f"http://{live.server.http_url}",
        "--interval", "0.3",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        _wait_for(lines, f"revision {serving_now.revision} is serving", 60)
        revision = _fresh("c")
        _configmap(watch.parent, json.dumps({"revision": revision, "model": str(target)}))
        line = _wait_for(lines, f"-> {revision}", 120)
        assert "reloaded recops_ensemble" in line
        live.model = target
        assert _serving(live, answers) == target

        _configmap(watch.parent, "{oops")
        _wait_for(lines, "not JSON", 30)
        _configmap(watch.parent, json.dumps({"revision": "x1", "model": str(tmp_path / "missing")}))
        _wait_for(lines, f"model directory {tmp_path / 'missing'} does not exist", 30)
        assert process.poll() is None
        assert _serving(live, answers) == target

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        _wait_for(lines, "reloader stopped", 5)
    finally:
        if process.poll() is None:
            process.kill()


class _FakeTriton:
    """A ModelControl that serves one revision and refuses every load: the reloader's own logic."""

    def __init__(self, steps: StepNames) -> None:
        self.steps, self.loads = steps, 0

    def serving_steps(self):
        return self.steps

    def load(self, name, config=None):
        from tritonclient.utils import InferenceServerException

        self.loads += 1
        raise InferenceServerException("boom")

    def unload(self, name):
        pass


@pytest.mark.slow
def test_bad_watch_content_is_logged_once_and_a_failed_reload_backs_off(tiny_model, tmp_path, caplog):
    watch = tmp_path / "reload.json"
    repository = tmp_path / "repo"
    repository.mkdir()
    triton = _FakeTriton(StepNames.for_revision("r1"))
    reloader = Reloader(watch, repository, triton)
    caplog.set_level(logging.INFO, logger="recops.reloader")

    assert reloader.poll(now=0) == "invalid"  # no file yet
    assert "cannot read watch file" in caplog.text
    watch.write_text('{"revision": "r2"}')
    assert reloader.poll(now=1) == "invalid" and "missing key 'model'" in caplog.text
    assert reloader.poll(now=2) == "unchanged"  # logged once, waits for a change
    watch.write_text(json.dumps({"revision": "r1", "model": str(tiny_model[2])}))
    assert reloader.poll(now=3) == "serving" and triton.loads == 0
    watch.write_text(json.dumps({"revision": "r2", "model": str(tiny_model[2])}))
    assert reloader.poll(now=4) == "failed" and "recops_ranker_r2 failed to load: boom" in caplog.text
    assert reloader.poll(now=4.5) == "waiting"  # 1 s back-off after the first failure
    assert reloader.poll(now=5.1) == "failed" and triton.loads == 2
    assert reloader.poll(now=6.5) == "waiting"  # then 2 s
    assert not (repository / "recops_preprocess_r2").exists()  # each attempt cleans up after itself


class _ScriptedTriton:
    """A ModelControl that keeps the state Triton would, with failures on cue."""

    def __init__(self, steps: StepNames, fail: str | None = None, lose_switch_answer: bool = False) -> None:
        self.steps, self.fail, self.lose_switch_answer = steps, fail, lose_switch_answer
        self.loaded = set(steps.all)
        self.calls: list[tuple[str, str]] = []

    def serving_steps(self):
        return self.steps

    def load(self, name, config=None):
        from tritonclient.utils import InferenceServerException

        from recops.serving.hot_reload import TritonUnreachable

        self.calls.append(("load", name))
        if name == self.fail:
            raise InferenceServerException(f"load failed for model '{name}': bad weights")
        if name == c.ENSEMBLE:
            self.steps = ensemble_steps(config)
            if self.lose_switch_answer:
                raise TritonUnreachable("the answer was lost")
        else:
            self.loaded.add(name)

    def unload(self, name):
        self.calls.append(("unload", name))
        self.loaded.discard(name)


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["ranker", "postprocess", "ensemble"])
def test_a_failed_attempt_leaves_the_serving_steps_alone(tiny_model, tmp_path, failing):
    repository = build_repository(tiny_model[2], tmp_path / "repo", revision="r1")
    old, new = StepNames.for_revision("r1"), StepNames.for_revision("r2")
    name = c.ENSEMBLE if failing == "ensemble" else getattr(new, failing)
    triton = _ScriptedTriton(old, fail=name)
    with pytest.raises(ReloadError, match=f"{name} failed to load: .*bad weights") as failed:
        hot_reload(repository, check_model(tiny_model[2]), "r2", triton)
    assert failed.value.model == name
    assert triton.steps == old and triton.loaded == set(old.all)
    assert not any(call == ("unload", step) for call in triton.calls for step in old.all)
    assert sorted(p.name for p in repository.iterdir()) == sorted([c.ENSEMBLE, *old.all])
    assert ensemble_steps(read_config(repository / c.ENSEMBLE / "config.pbtxt")) == old


@pytest.mark.slow
def test_a_switch_whose_answer_was_lost_is_settled_by_the_next_attempt(tiny_model, tmp_path):
    from recops.serving.hot_reload import TritonUnreachable

    repository = build_repository(tiny_model[2], tmp_path / "repo", revision="r1")
    old, new = StepNames.for_revision("r1"), StepNames.for_revision("r2")
    triton = _ScriptedTriton(old, lose_switch_answer=True)
    with pytest.raises(TritonUnreachable):
        hot_reload(repository, check_model(tiny_model[2]), "r2", triton)
    assert triton.steps == new and set(new.all) <= triton.loaded  # switched: nothing of r2 was undone
    assert hot_reload(repository, check_model(tiny_model[2]), "r2", triton) is None
    assert triton.loaded == set(new.all)  # r1's steps retired by the second attempt
    assert sorted(p.name for p in repository.iterdir()) == sorted([c.ENSEMBLE, *new.all])
    assert ensemble_steps(read_config(repository / c.ENSEMBLE / "config.pbtxt")) == new
