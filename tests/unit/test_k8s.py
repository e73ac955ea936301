"""k8s/ and docker/Dockerfile: the KubeRay deployment, checked without a cluster or Ray.

Every kustomization renders with `kubectl kustomize`; what it renders validates against the
KubeRay CRDs (../shared/kuberay-crds) and Kubernetes' own schemas (kubernetes-validate), unknown
fields rejected as `kubectl apply` rejects them; and what the schemas cannot see is checked
here: the RayJob's command and config, what Ray is told against what the pods get, /dev/shm,
placeholder secrets, the spot group's preemption notice and the elastic run's sizes, and the
image's pins against pyproject.toml.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import PurePosixPath
from typing import Any, Iterator, Optional

import jsonschema
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ftdist.cli import build_parser
from ftdist.config.load import load_config
from ftdist.config.schema import DistributedConfig
from ftdist.errors import UserError
from tests.conftest import REPO

K8S = REPO / "k8s"
DOCKERFILE = REPO / "docker" / "Dockerfile"
# The KubeRay CRDs live in the shared folder beside the repository (../shared), or in a
# checkout's own shared/ where it carries one.
CRDS = next((p for p in (REPO.parent / "shared" / "kuberay-crds", REPO / "shared" / "kuberay-crds") if p.is_dir()),
            REPO.parent / "shared" / "kuberay-crds")
KUBERNETES_VERSION = "1.32"  # the schemas kubernetes-validate checks core objects against

OVERLAYS = ["gpu", "gpu-tune", "gpu-cluster", "cpu-smoke", "gpu-spot"]
KUSTOMIZATIONS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
# Those that render a RayJob: (kustomization, the RayJob, the ftdist command it runs, its config file)
JOBS = [("base", "ftdist-train", "train", "base/train.yaml"),
        ("overlays/gpu", "ftdist-train", "train", "base/train.yaml"),
        ("overlays/cpu-smoke", "ftdist-train", "train", "overlays/cpu-smoke/train.yaml"),
        ("overlays/gpu-spot", "ftdist-train", "train", "overlays/gpu-spot/train.yaml"),
        ("overlays/gpu-tune", "ftdist-tune", "tune", "base/tune.yaml")]
RAY_KINDS = ("RayCluster", "RayJob")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------- rendering


@functools.cache
def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl not found: it renders k8s/ (`kubectl kustomize`); .ci/run installs one")
    out = subprocess.run([exe, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "v0")
    if int(re.sub(r"^v?(\d+).*", r"\1", version) or 0) < 5:
        pytest.fail(f"{exe} embeds kustomize {version}; k8s/ needs v5 (components, replacements): "
                    "kubectl 1.27 or newer (.ci/run installs one)")
    return exe


@functools.cache
def _render(path: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize k8s/{path} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.load_all(out.stdout, Loader=Loader) if doc)


def render(path: str) -> list[dict]:
    """What `kubectl kustomize k8s/<path>` renders (a copy: tests may change it)."""
    return copy.deepcopy(list(_render(path)))


def one(objs: list[dict], kind: str, name: Optional[str] = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def ray_groups(obj: dict) -> Iterator[tuple[str, dict]]:
    """(name, group) for the head group and each worker group of a RayCluster or RayJob."""
    spec = cluster_spec(obj)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """Every pod template of a RayCluster or RayJob: Ray groups, and the RayJob's submitter."""
    for name, group in ray_groups(obj):
        yield name, group["template"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield "submitter", obj["spec"]["submitterPodTemplate"]


def mounted_file(objs: list[dict], template: dict, container: dict, path: str) -> Optional[str]:
    """The text a container reads at `path` from a ConfigMap volume, or None."""
    file = PurePosixPath(path)
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume and file.parent == PurePosixPath(mount["mountPath"]):
            cm = one(objs, "ConfigMap", volume["configMap"]["name"])
            return cm["data"].get(file.name)
    return None


def rayjob_entrypoint_and_env(overlay: str) -> tuple[list[str], dict[str, str], str]:
    """The RayJob of k8s/overlays/<overlay> as its head pod runs it (the entrypoint runs there):
    the entrypoint's argv, the env it runs with (the head container's env and the job's
    runtime env; values from a Secret the overlay renders are filled in, from any other Secret
    they are `<secret NAME/KEY>` placeholders; optional keys are left out unless the rendered
    Secret has them), and
    the text of the config file the entrypoint names, from the mounted ConfigMap."""
    objs = render(f"overlays/{overlay}")
    job = one(objs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    head = cluster_spec(job)["headGroupSpec"]["template"]
    container = head["spec"]["containers"][0]
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"env {item['name']}: only literal values and secretKeyRef are resolved here"
        secret = secrets.get(ref["name"])
        if secret is None:
            if not ref.get("optional"):
                env[item["name"]] = f"<secret {ref['name']}/{ref['key']}>"
        elif ref["key"] in secret.get("stringData", {}):
            env[item["name"]] = secret["stringData"][ref["key"]]
        elif not ref.get("optional"):
            raise AssertionError(f"env {item['name']}: Secret {ref['name']} has no key {ref['key']}")
    runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
    env.update({k: str(v) for k, v in runtime_env.get("env_vars", {}).items()})
    config_path = next(a for a in argv[2:] if not a.startswith("-"))
    config_text = mounted_file(objs, head, container, config_path)
    assert config_text is not None, f"{config_path}: not mounted from a ConfigMap in the head pod"
    return argv, env, config_text


# ---------------------------------------------------------------- validators


def _strict(node: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server does (kubectl apply's
    default field validation is strict): additionalProperties false wherever properties are
    listed and unknown fields are not explicitly kept."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    assert CRDS.is_dir(), f"{CRDS}: the KubeRay CRDs are missing (the shared folder beside the repository)"
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=Loader)
        if crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served"))
            return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD of kind {kind} in {CRDS}")


def crd_errors(obj: dict) -> list[str]:
    assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(obj["kind"]).iter_errors(obj)]


def k8s_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def as_pod_template(template: dict, name: str) -> dict:
    """A pod template of a Ray resource as a core/v1 PodTemplate, for Kubernetes' schema."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def cpu(quantity: Any) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory(quantity: Any) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", str(quantity))
    assert m, f"not a memory quantity: {quantity!r}"
    return float(m[1]) * {**BINARY, **DECIMAL}.get(m[2] or "", 1)


def volume_for(template: dict, container: dict, mount_path: str) -> Optional[dict]:
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == mount_path:
            return volumes.get(mount["name"])
    return None


def shm_problems(obj: dict) -> list[str]:
    """Every Ray container has /dev/shm on a memory-backed emptyDir (a pod's default is 64 MB)."""
    problems = []
    for group, spec in ray_groups(obj):
        template = spec["template"]
        for container in template["spec"]["containers"]:
            volume = volume_for(template, container, "/dev/shm")
            if volume is None or volume.get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"{group}/{container['name']}: /dev/shm is not an emptyDir with medium Memory")
    return problems


def resource_problems(obj: dict) -> list[str]:
    """What rayStartParams tell Ray agrees with what Kubernetes gives the Ray container."""
    problems = []
    spec = cluster_spec(obj)
    for group, g in ray_groups(obj):
        params = g.get("rayStartParams", {})
        template = g["template"]
        container = template["spec"]["containers"][0]  # KubeRay runs Ray in the first container
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        where = f"{group}/{container['name']}"
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if int(params.get("num-gpus", gpus)) != gpus:
            problems.append(f"{where}: num-gpus {params.get('num-gpus')} but nvidia.com/gpu limit {gpus}")
        if gpus and int(requests.get("nvidia.com/gpu", gpus)) != gpus:
            problems.append(f"{where}: nvidia.com/gpu request differs from its limit")
        if "cpu" not in limits:
            problems.append(f"{where}: no cpu limit")
        elif "num-cpus" not in params:
            problems.append(f"{where}: no num-cpus (KubeRay would take the limit; say it)")
        else:
            # The head may advertise no CPU at all (it runs the driver, no task); else all of them.
            allowed = {cpu(limits["cpu"])} | ({0.0} if group == "head" else set())
            if float(params["num-cpus"]) not in allowed:
                problems.append(f"{where}: num-cpus {params['num-cpus']} but cpu limit {limits['cpu']}")
        if "memory" not in limits:
            problems.append(f"{where}: no memory limit")
        shm = volume_for(template, container, "/dev/shm") or {}
        shm_size = shm.get("emptyDir", {}).get("sizeLimit")
        if shm_size is not None:
            if "object-store-memory" not in params:
                problems.append(f"{where}: /dev/shm is {shm_size}, the object store unset (Ray's default "
                                "30% of memory may not fit)")
            elif float(params["object-store-memory"]) > memory(shm_size):
                problems.append(f"{where}: object-store-memory {params['object-store-memory']} > /dev/shm {shm_size}")
            if "memory" in limits and memory(shm_size) > memory(limits["memory"]):
                problems.append(f"{where}: /dev/shm {shm_size} > memory limit {limits['memory']}")
        if group != "head":
            if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
                problems.append(f"{where}: replicas not within minReplicas..maxReplicas")
            if not spec.get("enableInTreeAutoscaling") and g["minReplicas"] != g["maxReplicas"]:
                problems.append(f"{where}: min/max replicas differ without the autoscaler")
    return problems


PLACEHOLDER = re.compile(r"^(REPLACE_ME|[a-z-]*not-a-secret[a-z-]*)$")
SECRET_LOOKING = [
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),                              # AWS access key ids
    # AWS secret keys: 40 of base64's characters with digits and both cases
    re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}\d)(?=[A-Za-z0-9/+]{0,39}[a-z])"
               r"(?=[A-Za-z0-9/+]{0,39}[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),                                 # Hugging Face tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def secret_problems(docs: list[dict], text: str) -> list[str]:
    """Secrets hold placeholders only, and nothing in the text looks like a real key."""
    problems = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            if doc.get("data"):
                problems.append(f"Secret {doc['metadata']['name']}: data (base64) instead of stringData placeholders")
            for key, value in (doc.get("stringData") or {}).items():
                if not PLACEHOLDER.match(str(value)):
                    problems.append(f"Secret {doc['metadata']['name']}: {key} is not a placeholder")
    for pattern in SECRET_LOOKING:
        if pattern.search(text):
            problems.append(f"something looks like a real key ({pattern.pattern})")
    return problems


def fit_problems(objs: list[dict], job: dict, config, workers: Optional[int] = None) -> list[str]:
    """The run's Ray Train workers (distributed.workers, or `workers`) fit the job's cluster at
    its largest."""
    problems = []
    d = config.distributed
    workers = d.workers if workers is None else workers
    use_gpu = d.use_gpu is True or (d.use_gpu == "auto" and any(
        int(g.get("rayStartParams", {}).get("num-gpus", 0)) for _, g in ray_groups(job)))
    need = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {}), **d.resources_per_worker}
    fit = 0
    for group, g in ray_groups(job):
        params = g.get("rayStartParams", {})
        have = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
        per_pod = min(int(have.get(k, 0) // v) for k, v in need.items() if v)
        fit += per_pod * (1 if group == "head" else g["maxReplicas"])
    if fit < workers:
        problems.append(f"{workers} workers of {need} do not fit: at most {fit}")
    return problems


DEFAULT_RESIZE_CHECK_S = DistributedConfig.model_fields["resize_check_s"].default


def run_config(text: str, tmp_path) -> tuple[Any, range]:
    """A RayJob's config as ftdist loads it, and the worker counts its run may have:
    distributed.workers N, or [min, max] for an elastic run (Ray Train resizes it within the range)."""
    (tmp_path / "config.yaml").write_text(text)
    cfg = load_config(tmp_path / "config.yaml")
    return cfg, cfg.distributed.sizes


def elastic_problems(objs: list[dict], job: dict, text: str, tmp_path) -> list[str]:
    """An elastic run (distributed.workers: [min, max]) fits the job's cluster at max; its global
    batch splits into micro-batches at every size Ray Train may pick (ftdist refuses a size it
    does not split at); the autoscaler keeps a node it brought up for a grow until Ray Train's
    next resize check; it says how many worker-group restarts it takes."""
    d = yaml.safe_load(text)["distributed"]
    workers = d.get("workers")
    if not (isinstance(workers, list) and len(workers) == 2 and all(isinstance(n, int) for n in workers)
            and 1 <= workers[0] < workers[1]):
        return [f"distributed.workers {workers!r} is not a range [min, max] with 1 <= min < max"]
    try:  # ftdist refuses a range at some size of which the global batch would change
        cfg, sizes = run_config(text, tmp_path)
    except UserError as e:
        return [str(e)]
    problems = fit_problems(objs, job, cfg, workers=sizes[-1])
    spec = cluster_spec(job)
    resize_check_s = d.get("resize_check_s", DEFAULT_RESIZE_CHECK_S)
    idle_s = spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds")
    if not spec.get("enableInTreeAutoscaling") or idle_s is None:
        problems.append("no autoscaler with an idle timeout: nothing brings up nodes for the run to grow back")
    elif idle_s <= resize_check_s:
        problems.append(f"idleTimeoutSeconds {idle_s} <= distributed.resize_check_s {resize_check_s}: a node "
                        "brought up for a grow may go before Ray Train's resize check takes it")
    if "max_failures" not in d:
        problems.append("distributed.max_failures unset: every reclaim restarts the worker group")
    return problems


# The spot labels and taints of GKE (Spot VMs), AKS (spot node pools) and Karpenter (EKS).
SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "kubernetes.azure.com/scalesetpriority": "spot",
               "karpenter.sh/capacity-type": "spot"}
EXIT_MARGIN_S = 10  # of a grace period, after the preStop hook: Ray's own exit on SIGTERM
CHECKPOINT_S = 60   # at least, for a step and a checkpoint of overlays/gpu-spot's run (about 10 s and seconds)


def drain_hook(container: dict) -> tuple[dict, int, int]:
    """The drain in a Ray container's preStop hook,
    `timeout T ray drain-node OPTIONS && sleep S`: (the options as Ray's own CLI parses them, T, S)."""
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    assert command[:2] in (["/bin/bash", "-c"], ["/bin/sh", "-c"]) and len(command) == 3, \
        f"preStop is not a shell command: {command}"
    parts = [shlex.split(part) for part in command[2].split("&&")]
    assert len(parts) == 2 and parts[0][:1] == ["timeout"] and parts[0][2:4] == ["ray", "drain-node"], \
        f"preStop is not `timeout T ray drain-node ... && sleep S`: {command[2]!r}"
    assert parts[1][:1] == ["sleep"] and len(parts[1]) == 2, f"preStop does not end in `sleep S`: {command[2]!r}"
    import click
    from ray.scripts.scripts import drain_node

    try:
        options = drain_node.make_context("drain-node", parts[0][4:]).params
    except click.ClickException as e:
        raise AssertionError(f"ray drain-node {shlex.join(parts[0][4:])}: {e.format_message()}") from None
    return options, int(parts[0][1]), int(parts[1][1])


def preemption_problems(job: dict) -> list[str]:
    """The spot group (components/spot): GPU nodes with a spot label of GKE, AKS or Karpenter
    and nothing else, their taints tolerated; from 0 pods through the autoscaler; a pod's
    termination turned into Ray's preemption notice (preStop: drain with reason PREEMPTION and a
    deadline covering a checkpoint, then wait it out) inside its grace period. The head off spot
    nodes, its grace covering the driver's SIGTERM path (a checkpoint too)."""
    spec = cluster_spec(job)
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    if "spot" not in groups:
        return ["no worker group `spot`"]
    group = groups["spot"]
    pod = group["template"]["spec"]
    problems = []
    if pod.get("nodeSelector", {}).get("nvidia.com/gpu.present") != "true":
        problems.append("spot: not only on GPU nodes (nodeSelector nvidia.com/gpu.present)")
    terms = (pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
             .get("nodeSelectorTerms", []))
    spot_terms = [[{"key": key, "operator": "In", "values": [value]}] for key, value in SPOT_LABELS.items()]
    if sorted(map(json.dumps, (t.get("matchExpressions") for t in terms))) != sorted(map(json.dumps, spot_terms)):
        problems.append(f"spot: its node affinity is not one term per spot label {sorted(SPOT_LABELS)}: {terms}")
    for key, value in SPOT_LABELS.items():
        if not any(t.get("key") == key and t.get("effect") == "NoSchedule"
                   and (t.get("operator") == "Exists" or t.get("value") == value) for t in pod.get("tolerations", [])):
            problems.append(f"spot: no toleration of the taint {key}={value}:NoSchedule")
    if group["minReplicas"] != 0 or group["maxReplicas"] < 1:
        problems.append(f"spot: minReplicas {group['minReplicas']}, maxReplicas {group['maxReplicas']} (0 and >= 1)")
    if not spec.get("enableInTreeAutoscaling") or "idleTimeoutSeconds" not in spec.get("autoscalerOptions", {}):
        problems.append("no autoscaler with an idle timeout: the spot group never grows from 0")
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    deadline = 0
    try:
        options, drain_timeout, wait = drain_hook(pod["containers"][0])
    except (AssertionError, ValueError, IndexError) as e:
        problems.append(f"spot: {e}")
    else:
        deadline = options["deadline_remaining_seconds"] or 0
        if options["reason"] != "DRAIN_NODE_REASON_PREEMPTION":
            problems.append(f"spot: drains with reason {options['reason']}, not DRAIN_NODE_REASON_PREEMPTION")
        if options["node_id"] is not None or options["address"] is not None:
            problems.append("spot: the drain names a node or an address: it drains the pod's own node")
        if deadline < CHECKPOINT_S:
            problems.append(f"spot: the drain's deadline {deadline} s is under {CHECKPOINT_S} s (a step and a checkpoint)")
        if wait < deadline:
            problems.append(f"spot: the hook waits {wait} s, less than the {deadline} s Ray was told")
        if grace < drain_timeout + wait + EXIT_MARGIN_S:
            problems.append(f"spot: terminationGracePeriodSeconds {grace} < the drain's {drain_timeout} s + the "
                            f"{wait} s wait + {EXIT_MARGIN_S} s")
    head = spec["headGroupSpec"]["template"]["spec"]
    head_terms = (head.get("affinity", {}).get("nodeAffinity", {})
                  .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    for key, value in SPOT_LABELS.items():
        if not head_terms or not all({"key": key, "operator": "NotIn", "values": [value]} in t.get("matchExpressions", [])
                                     for t in head_terms):
            problems.append(f"head: not kept off nodes with {key}={value}")
    hook = " ".join(head["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
    driver_wait = re.search(r"kill -TERM (\S+) && timeout (\d+) tail --pid=\1 ", hook)
    if driver_wait is None:
        problems.append("head: preStop does not SIGTERM the driver and wait for it (`kill -TERM P && timeout N tail --pid=P`)")
    else:
        head_grace = head.get("terminationGracePeriodSeconds", 30)
        if int(driver_wait[2]) < deadline:
            problems.append(f"head: waits {driver_wait[2]} s for the driver, less than the workers' {deadline} s")
        if head_grace < int(driver_wait[2]) + EXIT_MARGIN_S:
            problems.append(f"head: terminationGracePeriodSeconds {head_grace} < the driver's {driver_wait[2]} s "
                            f"+ {EXIT_MARGIN_S} s")
    return problems


TRACKER_EXTRAS = ("tensorboard", "mlflow", "wandb")  # in the image: a cluster's runs report from it


def dockerfile_pins(text: str) -> dict[str, Requirement]:
    """The exact pins (`name==version`) of the Dockerfile's `pip install` commands."""
    text = re.sub(r"\\\n", " ", text)
    pins: dict[str, Requirement] = {}
    takes_value = {"-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-r", "--requirement",
                   "-f", "--find-links"}
    for line in text.splitlines():
        if not line.strip().startswith("RUN"):
            continue
        for command in re.split(r"&&|;", line.strip()[3:]):
            words = shlex.split(command)
            if "pip" not in words[:2] or "install" not in words:
                continue
            skip = False
            for word in words[words.index("install") + 1:]:
                if skip or word.startswith("-"):
                    skip = not skip and word in takes_value
                    continue
                try:
                    req = Requirement(word)
                except InvalidRequirement:
                    continue
                specs = list(req.specifier)
                if len(specs) == 1 and specs[0].operator == "==":
                    pins[canonicalize_name(req.name)] = req
    return pins


def pin_problems(dockerfile: str, pyproject: dict) -> list[str]:
    """Every requirement of pyproject.toml, and the trackers' extras, is pinned in the Dockerfile,
    inside its range, with its extras; ray exactly 2.60.0."""
    pins = dockerfile_pins(dockerfile)
    problems = []
    extras = pyproject["project"].get("optional-dependencies", {})
    for line in pyproject["project"]["dependencies"] + [r for key in TRACKER_EXTRAS for r in extras.get(key, [])]:
        req = Requirement(line)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: not pinned in the Dockerfile")
            continue
        version = next(iter(pin.specifier)).version
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version}: outside pyproject.toml's {req.specifier}")
        if not req.extras <= pin.extras:
            problems.append(f"{req.name}: extras {sorted(req.extras - pin.extras)} missing")
    ray = pins.get("ray")
    if ray is None or str(ray.specifier) != "==2.60.0":
        problems.append(f"ray is not pinned at 2.60.0: {ray}")
    return problems


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------- the files


def test_every_yaml_file_under_k8s_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: empty"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomizations_render(path):
    objs = render(path)
    kinds = sorted(o["kind"] for o in objs)
    ids = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(ids) == len(set(ids)), f"duplicate objects: {ids}"
    assert {"ServiceAccount", "ConfigMap"} <= set(kinds)
    expected = {"base": ["RayCluster", "RayJob"], "overlays/gpu": ["RayJob"], "overlays/gpu-tune": ["RayJob"],
                "overlays/cpu-smoke": ["RayJob"], "overlays/gpu-cluster": ["RayCluster"],
                "overlays/gpu-spot": ["RayJob"]}[path]
    assert [k for k in kinds if k in RAY_KINDS] == expected
    # The real Secret is made by hand: an overlay that carried the example would overwrite it.
    assert ("Secret" in kinds) == (path == "overlays/cpu-smoke")


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_ray_resources_validate_against_the_kuberay_crds(path):
    ray = [o for o in render(path) if o["kind"] in RAY_KINDS]
    assert ray
    for obj in ray:
        assert crd_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_the_crd_validation_rejects_broken_copies():
    job = one(render("overlays/gpu"), "RayJob")
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["shutdownAfterJobFinish"] = misspelled["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(misspelled))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in crd_errors(wrong_type))
    not_a_string = copy.deepcopy(job)
    not_a_string["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert crd_errors(not_a_string)
    cluster = one(render("overlays/gpu-cluster"), "RayCluster")
    deep_typo = copy.deepcopy(cluster)
    deep_typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in e for e in crd_errors(deep_typo))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_core_objects_and_pod_templates_validate_against_kubernetes_schemas(path):
    checked = set()
    for obj in render(path):
        if obj["kind"] in RAY_KINDS:
            for name, template in pod_templates(obj):
                k8s_validate(as_pod_template(template, f"{obj['metadata']['name']}-{name}"))
                checked.add(f"{obj['kind']}/{name}")
        else:
            k8s_validate(obj)
            checked.add(obj["kind"])
    assert {"ServiceAccount", "ConfigMap"} <= checked
    assert any(c.endswith("/head") for c in checked) and any(c.endswith("/workers") for c in checked)
    if path in [job[0] for job in JOBS]:
        assert "RayJob/submitter" in checked


def test_kubernetes_validation_rejects_broken_copies():
    from kubernetes_validate import ValidationError

    objs = render("overlays/cpu-smoke")
    job = one(objs, "RayJob")
    template = copy.deepcopy(dict(pod_templates(job))["head"])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(ValidationError):
        k8s_validate(as_pod_template(template, "broken"))
    template = copy.deepcopy(dict(pod_templates(job))["submitter"])
    template["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]  # a number
    with pytest.raises(ValidationError):
        k8s_validate(as_pod_template(template, "broken"))
    secret = copy.deepcopy(one(objs, "Secret"))
    secret["stringdata"] = secret.pop("stringData")
    with pytest.raises(ValidationError):
        k8s_validate(secret)


# ---------------------------------------------------------------- the RayJob


@pytest.mark.parametrize("path, name, command, source", JOBS)
def test_the_rayjob_runs_ftdist_on_its_own_cluster_and_retries_resume(path, name, command, source, tmp_path):
    objs = render(path)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "RayJob"] == [name]  # one job per overlay
    job = one(objs, "RayJob")
    spec = job["spec"]
    assert "generateName" not in job["metadata"] and job["metadata"]["name"] == name
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec  # its own cluster, deleted after
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    if path != "base":  # the overlays' cluster is the patched one, not base's
        assert "RayCluster" not in [o["kind"] for o in objs]

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "ftdist"
    args = build_parser().parse_args(argv[1:])
    assert args.command == command and not getattr(args, "local", False) and not args.restart
    assert args.overrides == [] and args.config == f"/config/{command}.yaml"
    head = cluster_spec(job)["headGroupSpec"]["template"]
    text = mounted_file(objs, head, head["spec"]["containers"][0], args.config)
    assert text is not None, "the config is not mounted in the head pod (where the entrypoint runs)"
    assert text == (K8S / source).read_text()
    cfg, sizes = run_config(text, tmp_path)
    # A retry runs the same command on the same run directory in the store, and resumes there.
    assert cfg.run.output.startswith("s3://") and not re.search(r"\d{8}|\d{4}-\d\d-\d\d", cfg.run.output + cfg.run.name)
    if command == "train":
        assert sizes[0] >= 2
        assert fit_problems(objs, job, cfg, workers=sizes[-1]) == []
    else:  # the search's experiment is as fixed as a run; its concurrent trials fit the cluster together
        assert cfg.tune is not None and not re.search(r"\d{8}|\d{4}-\d\d-\d\d", cfg.tune.name)
        assert cfg.tune.max_concurrent_trials >= 2
        together = cfg.distributed.model_copy(update={"workers": cfg.distributed.workers * cfg.tune.max_concurrent_trials})
        assert fit_problems(objs, job, cfg.model_copy(update={"distributed": together})) == []
    # The job's env is what `ray job submit --runtime-env cluster/runtime_env.yaml` gives.
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": runtime_env["env_vars"]}


def test_a_broken_entrypoint_or_config_is_caught(tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("ftdist trian /config/train.yaml")[1:])
    text = (K8S / "base" / "train.yaml").read_text().replace("micro_batch_size: 4", "micro_batch_size: 5")
    (tmp_path / "train.yaml").write_text(text)
    with pytest.raises(UserError, match="micro_batch_size"):
        load_config(tmp_path / "train.yaml")
    objs = render("overlays/gpu")
    job = one(objs, "RayJob")
    cfg = load_config(K8S / "base" / "train.yaml", ["distributed.workers=64"])
    assert fit_problems(objs, job, cfg)


def test_rayjob_entrypoint_and_env_gives_what_the_head_pod_runs():
    argv, env, config = rayjob_entrypoint_and_env("cpu-smoke")
    assert argv == ["ftdist", "train", "/config/train.yaml"]
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "smoke-not-a-secret"
    assert "AWS_SESSION_TOKEN" not in env and "HF_TOKEN" not in env  # optional, not in the Secret
    assert env["PYTHONUNBUFFERED"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert yaml.safe_load(config)["storage"]["endpoint_url"] == "http://minio:9000"
    _, env, _ = rayjob_entrypoint_and_env("gpu")
    assert env["AWS_SECRET_ACCESS_KEY"] == "<secret ftdist-s3/AWS_SECRET_ACCESS_KEY>" and "HF_TOKEN" not in env


def test_the_cpu_smoke_run_uses_the_store_in_the_cluster():
    objs = render("overlays/cpu-smoke")
    _, _, text = rayjob_entrypoint_and_env("cpu-smoke")
    config = yaml.safe_load(text)
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", config["storage"]["endpoint_url"]).groups()
    service = one(objs, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    deployment = one(objs, "Deployment", "minio")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    bucket = config["run"]["output"].removeprefix("s3://").split("/")[0]
    make_bucket = one(objs, "Job", "minio-bucket")["spec"]["template"]["spec"]["containers"][0]
    assert f'"{bucket}"' in " ".join(make_bucket["args"]) and config["storage"]["endpoint_url"] in make_bucket["args"][0]
    assert config["distributed"]["use_gpu"] is False
    assert "nvidia.com/gpu" not in json.dumps(objs)  # nothing asks for a GPU a laptop lacks


# ---------------------------------------------------------------- pods


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_dev_shm_is_memory_backed_on_every_ray_container(path):
    for obj in render(path):
        if obj["kind"] in RAY_KINDS:
            assert shm_problems(obj) == []
    job = one(render("overlays/gpu"), "RayJob")
    del cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert shm_problems(job) == ["workers/ray-worker: /dev/shm is not an emptyDir with medium Memory"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_ray_start_params_match_the_container_limits(path):
    for obj in render(path):
        if obj["kind"] in RAY_KINDS:
            assert resource_problems(obj) == []


def test_mismatched_ray_start_params_are_caught():
    job = one(render("overlays/gpu"), "RayJob")
    workers = cluster_spec(job)["workerGroupSpecs"][0]
    assert workers["rayStartParams"]["num-gpus"] == "8"
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    broken = copy.deepcopy(job)
    cluster_spec(broken)["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "4"
    assert any("num-gpus" in p for p in resource_problems(broken))
    broken = copy.deepcopy(job)
    cluster_spec(broken)["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "96"
    assert any("num-cpus" in p for p in resource_problems(broken))
    broken = copy.deepcopy(job)
    cluster_spec(broken)["workerGroupSpecs"][0]["rayStartParams"]["object-store-memory"] = str(300 * 2**30)
    assert any("object-store-memory" in p for p in resource_problems(broken))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_ray_pod_gets_the_store_credentials_from_the_secret_and_one_image(path):
    version = pyproject()["project"]["version"]
    for obj in render(path):
        if obj["kind"] not in RAY_KINDS:
            continue
        assert cluster_spec(obj)["rayVersion"] == "2.60.0"
        images = set()
        for name, template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                images.add(container["image"])
                env = {e["name"]: e for e in container.get("env", [])}
                for key in SECRET_ENV:  # never a literal value
                    assert "value" not in env.get(key, {}), f"{name}: {key} must come from the Secret"
                if name != "submitter":
                    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "ftdist-s3", "key": key}
        assert len(images) == 1, f"one image for head, workers and submitter: {images}"
        image = images.pop()
        if "gpu" in path:
            assert image.endswith(f":{version}") and "/" in image  # pushed to a registry, tagged
        if path == "overlays/cpu-smoke":
            assert image == f"ftdist:{version}"  # built and loaded locally


def test_secrets_are_placeholders_and_nothing_looks_like_a_real_key():
    files = sorted(K8S.rglob("*.yaml")) + [DOCKERFILE]
    text = "\n".join(p.read_text() for p in files)
    docs = [d for p in K8S.rglob("*.yaml") for d in yaml.safe_load_all(p.read_text())]
    assert any(isinstance(d, dict) and d.get("kind") == "Secret" for d in docs)
    assert secret_problems(docs, text) == []
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    assert set(example["stringData"].values()) == {"REPLACE_ME"}
    planted = copy.deepcopy(example)
    planted["stringData"]["AWS_ACCESS_KEY_ID"] = "AKIA" + "Q7" * 8
    assert len(secret_problems([planted], yaml.safe_dump(planted))) == 2


# ---------------------------------------------------------------- spot nodes, the elastic run


def spot_job() -> tuple[list[dict], dict, str]:
    """overlays/gpu-spot: what it renders, its RayJob, the config the head pod reads."""
    objs = render("overlays/gpu-spot")
    _, _, config = rayjob_entrypoint_and_env("gpu-spot")
    return objs, one(objs, "RayJob"), config


def groups_of(job: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec(job)["workerGroupSpecs"]}


def test_spot_pods_turn_their_termination_into_rays_preemption_notice():
    _, job, _ = spot_job()
    assert preemption_problems(job) == []
    groups = groups_of(job)
    spot = groups["spot"]
    assert spot["minReplicas"] == spot["replicas"] == 0 and spot["maxReplicas"] >= 1
    assert groups["workers"]["maxReplicas"] == 0  # no on-demand GPU the autoscaler could pick instead
    options, drain_timeout, wait = drain_hook(spot["template"]["spec"]["containers"][0])
    assert options["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert CHECKPOINT_S <= options["deadline_remaining_seconds"] <= wait
    assert spot["template"]["spec"]["terminationGracePeriodSeconds"] >= drain_timeout + wait + EXIT_MARGIN_S
    # Only the spot overlay has a spot group and the hooks.
    for path in KUSTOMIZATIONS:
        for obj in render(path) if path != "overlays/gpu-spot" else []:
            if obj["kind"] in RAY_KINDS:
                assert "spot" not in [name for name, _ in ray_groups(obj)]
                assert not any("lifecycle" in c for _, t in pod_templates(obj) for c in t["spec"]["containers"])


def edit_hook(pod: dict, old: str, new: str) -> None:
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert old in command[2]
    command[2] = command[2].replace(old, new)


def set_affinity(pod: dict, terms: list) -> None:
    pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] = terms


BROKEN_SPOT = {  # what a copy gets: (spec, spot pod, head pod) -> None, and the problem it makes
    "grace under the deadline": (lambda s, pod, head: pod.update(terminationGracePeriodSeconds=60),
                                 "terminationGracePeriodSeconds 60 < the drain's 15 s + the 90 s wait"),
    "grace without the margin": (lambda s, pod, head: pod.update(terminationGracePeriodSeconds=100),
                                 "terminationGracePeriodSeconds 100 <"),
    "Kubernetes' default grace": (lambda s, pod, head: pod.pop("terminationGracePeriodSeconds"),
                                  "terminationGracePeriodSeconds 30 <"),
    "idle reason": (lambda s, pod, head: edit_hook(pod, "REASON_PREEMPTION", "REASON_IDLE_TERMINATION"),
                    "not DRAIN_NODE_REASON_PREEMPTION"),
    "unknown reason": (lambda s, pod, head: edit_hook(pod, "DRAIN_NODE_REASON_PREEMPTION", "PREEMPTION"),
                       "is not one of"),
    "no deadline": (lambda s, pod, head: edit_hook(pod, "--deadline-remaining-seconds 90", ""),
                    "deadline 0 s is under"),
    "short wait": (lambda s, pod, head: edit_hook(pod, "sleep 90", "sleep 30"), "waits 30 s, less than the 90 s"),
    "no wait": (lambda s, pod, head: edit_hook(pod, "&& sleep 90", ""), "preStop is not"),
    "another node": (lambda s, pod, head: edit_hook(pod, "drain-node", "drain-node --node-id 0a1b"), "names a node"),
    "a taint not tolerated": (lambda s, pod, head: pod["tolerations"].pop(), "karpenter.sh/capacity-type=spot"),
    "on-demand nodes too": (lambda s, pod, head: set_affinity(pod, [{"matchExpressions": [
        {"key": "nvidia.com/gpu.present", "operator": "Exists"}]}]), "node affinity"),
    "any node": (lambda s, pod, head: pod.pop("nodeSelector"), "GPU nodes"),
    "a pod always up": (lambda s, pod, head: s["workerGroupSpecs"][1].update(minReplicas=1), "minReplicas 1"),
    "no autoscaler": (lambda s, pod, head: s.update(enableInTreeAutoscaling=False), "no autoscaler"),
    "head on spot": (lambda s, pod, head: head.pop("affinity"), "head: not kept off"),
    "head's default grace": (lambda s, pod, head: head.pop("terminationGracePeriodSeconds"),
                             "head: terminationGracePeriodSeconds 30 < the driver's 100 s"),
    "driver not told": (lambda s, pod, head: head["containers"][0].pop("lifecycle"), "head: preStop does not"),
    "driver cut short": (lambda s, pod, head: edit_hook(head, "timeout 100", "timeout 30"), "head: waits 30 s"),
}


@pytest.mark.parametrize("case", BROKEN_SPOT)
def test_a_spot_group_that_would_lose_its_checkpoint_is_caught(case):
    change, problem = BROKEN_SPOT[case]
    _, job, _ = spot_job()
    spec = cluster_spec(job)
    assert spec["workerGroupSpecs"][1]["groupName"] == "spot"
    change(spec, spec["workerGroupSpecs"][1]["template"]["spec"], spec["headGroupSpec"]["template"]["spec"])
    problems = preemption_problems(job)
    assert any(problem in p for p in problems), problems


def test_the_elastic_run_fits_the_spot_group_and_splits_its_batch_at_every_size(tmp_path):
    objs, job, config = spot_job()
    assert elastic_problems(objs, job, config, tmp_path) == []
    cfg, sizes = run_config(config, tmp_path)
    spot = groups_of(job)["spot"]
    assert len(sizes) >= 2 and sizes[-1] <= spot["maxReplicas"] * int(spot["rayStartParams"]["num-gpus"])
    for n in sizes:
        assert cfg.train.batch_size % (cfg.train.micro_batch_size * n) == 0
    distributed = yaml.safe_load(config)["distributed"]
    assert distributed["resize_check_s"] < cluster_spec(job)["autoscalerOptions"]["idleTimeoutSeconds"]
    assert distributed["max_failures"] > yaml.safe_load((K8S / "base" / "train.yaml").read_text())["distributed"]["max_failures"]


def test_a_broken_elastic_config_is_caught(tmp_path):
    objs, job, config = spot_job()

    def problems(old: str, new: str, in_job: Optional[dict] = None) -> list[str]:
        assert old in config
        return elastic_problems(objs, in_job or job, config.replace(old, new), tmp_path)

    assert any("at 7 worker(s)" in p for p in problems("batch_size: 168", "batch_size: 192"))  # 6 x 32, 8 x 24
    nine = config.replace("workers: [6, 8]", "workers: [6, 9]").replace("batch_size: 168", "batch_size: 504")
    assert any("9 workers" in p and "do not fit" in p for p in elastic_problems(objs, job, nine, tmp_path))
    assert any("not a range" in p for p in problems("workers: [6, 8]", "workers: 8"))
    assert any("not a range" in p for p in problems("workers: [6, 8]", "workers: [8, 6]"))
    assert any("resize_check_s 900" in p for p in problems("resize_check_s: 300", "resize_check_s: 900"))
    assert any("max_failures unset" in p for p in problems("max_failures: 20", "# max_failures left out"))
    no_autoscaler = copy.deepcopy(job)
    cluster_spec(no_autoscaler)["enableInTreeAutoscaling"] = False
    assert any("no autoscaler" in p for p in problems("resize_check_s: 300", "resize_check_s: 300", no_autoscaler))


# ---------------------------------------------------------------- the image


def test_dockerfile_pins_agree_with_pyproject():
    text = DOCKERFILE.read_text()
    assert pin_problems(text, pyproject()) == []
    pins = dockerfile_pins(text)
    make_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)[1]
    assert str(pins["torch"]) == make_torch  # the suite's torch, as a CUDA build
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-cudnn-runtime-ubuntu[\d.]+$", text, re.M)
    assert "python3.11 -m venv" in text and re.search(r"^RUN pip install \.", text, re.M)
    broken = text.replace('"transformers==5.23.0"', '"transformers==4.57.0"').replace('"s3fs==2026.9.0"', "")
    assert sorted(p.split(":")[0].split("=")[0] for p in pin_problems(broken, pyproject())) == ["s3fs", "transformers"]
    assert any(p.startswith("ray") for p in pin_problems(text.replace("ray[train,tune,default]==2.60.0",
                                                                       "ray[train]==2.60.0"), pyproject()))
