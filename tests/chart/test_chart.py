#!/usr/bin/env python3
"""Offline test of the Helm chart in charts/tessera.

Lints and renders the chart with Helm's own engine (the PyPI package helm-python-sdk, which
bundles Helm v4 as a shared library: no helm binary, no cluster), validates every rendered
object against the Kubernetes OpenAPI schemas of a pinned Kubernetes version with
kubernetes-validate in strict mode (unknown fields are errors), and asserts on the rendered
objects: replicas, Raft peers, the coordinator ports (public gRPC and HTTP APIs on the client
Service, cluster protocol on the headless one), API keys from a Secret, gRPC probes, the
PodDisruptionBudget, GPU resources, anti-affinity, the headless Service, security settings and
the model source. It also checks that values.schema.json rejects an even coordinator count and
bad ports.

Prints one line per failed check and closes with "chart: N checks passed" (exit 0) or
"chart: N checks passed, M failed" (exit 1).

Usage: python tests/chart/test_chart.py  (scripts/test-chart.sh prepares the venv)
"""

from __future__ import annotations

import copy
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

CHART = Path(__file__).resolve().parents[2] / "charts" / "tessera"
# A bundled schema set of kubernetes-validate; gRPC probes are GA since 1.27.
KUBE_VERSION = "1.33.0"
RELEASE = "demo"
NAMESPACE = "ml"
# Objects that come from CRDs: kubernetes-validate has no schema for them, so the test checks
# their shape itself.
CRD_KINDS = {"ServiceMonitor", "Certificate"}


class Checks:
    """Counts checks; a failed one is recorded with its message instead of stopping the run."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.scope = ""

    def __call__(self, cond: bool, msg: str) -> bool:
        if cond:
            self.passed += 1
        else:
            self.failed.append(f"{self.scope}: {msg}")
            print(f"FAIL {self.scope}: {msg}", flush=True)
        return cond

    def eq(self, got: Any, want: Any, msg: str) -> bool:
        return self(got == want, f"{msg}: got {got!r}, want {want!r}")


check = Checks()


def render(values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Renders the chart with `values`; returns the objects and NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects, notes


def validate_all(objects: list[dict[str, Any]]) -> None:
    """Every object must pass strict schema validation (CRD kinds: a shape check instead)."""
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            check(True, name)
        except SchemaNotFoundError:
            check(obj.get("kind") in CRD_KINDS, f"{name}: no Kubernetes schema for this kind")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            check(False, f"{name} does not validate against {KUBE_VERSION} (strict): {path}: {e.message}")


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of `kind` named `name`; raises AssertionError when absent."""
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(hits) != 1:
        raise AssertionError(f"expected one {kind}/{name}, found {len(hits)}")
    return hits[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """The container `name` of a workload's pod template."""
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def arg(c: dict[str, Any], flag: str) -> str | None:
    """The value of `--flag=value` in a container's args, or None."""
    for a in c.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def with_values(**overrides: Any) -> dict[str, Any]:
    """Values from dotted keys: with_values(**{"coordinator.replicas": 5})."""
    out: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(value)
    return out


COORD = f"{RELEASE}-tessera-coordinator"
HEADLESS = f"{COORD}-headless"
WORKER = f"{RELEASE}-tessera-worker"
CLIENT = f"{RELEASE}-tessera"
SCALE_JOB = f"{RELEASE}-tessera-coordinator-scale"


def coordinator_host(i: int) -> str:
    return f"{COORD}-{i}.{HEADLESS}.{NAMESPACE}.svc.cluster.local"


# ---------------------------------------------------------------------------------------------
# The tests. Each is a function; a raised exception counts as one failed check.


def test_lint() -> None:
    """Ensures that `helm lint --strict` finds no warning or error with default and other values."""
    for values in [{}, with_values(**{"coordinator.replicas": 5, "worker.gpus": 1}),
                   with_values(**{"model.source": "pvc", "model.pvc.claimName": "models"}),
                   with_values(**{"apiKeys.existingSecret": "tessera-api-keys"})]:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        bad = [m for m in report["messages"] if m["severity"] >= 2]
        check(not bad and not report["errors"], f"lint {values}: {bad or report['errors']}")


def test_defaults_validate_and_shape() -> None:
    """Ensures that the default render validates strictly and has the expected objects."""
    objects, notes = render({})
    validate_all(objects)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    check.eq(kinds, sorted([
        ("PodDisruptionBudget", COORD), ("PodDisruptionBudget", WORKER), ("Service", CLIENT), ("Service", HEADLESS),
        ("Service", WORKER), ("ServiceAccount", CLIENT), ("StatefulSet", COORD), ("Job", SCALE_JOB),
        ("Deployment", WORKER), ("NetworkPolicy", COORD), ("NetworkPolicy", WORKER)]), "rendered objects")
    check("ServiceMonitor" not in {o["kind"] for o in objects}, "no ServiceMonitor by default")
    check(f"port-forward service/{CLIENT} 50051:50051 8000:8000" in notes, "NOTES: port-forward of gRPC and HTTP")
    check("curl -s http://127.0.0.1:8000/v1/chat/completions" in notes, "NOTES: a first HTTP request")
    check("Authorization" not in notes, "NOTES: no API key without a Secret")
    check("tessera generate --endpoint http://127.0.0.1:50051" in notes, "NOTES: first generate request")
    check("grpcurl" in notes, "NOTES: grpcurl alternative")


def test_coordinator_statefulset() -> None:
    """Ensures that the coordinators are a parallel StatefulSet with the agreed flags, claims and probes."""
    objects, _ = render({})
    sts = find(objects, "StatefulSet", COORD)
    spec = sts["spec"]
    check.eq(spec["replicas"], 3, "default coordinator replicas")
    check.eq(spec["serviceName"], HEADLESS, "serviceName is the headless Service")
    check.eq(spec["podManagementPolicy"], "Parallel", "peers start together")
    c = container(sts, "coordinator")
    check.eq(c["args"][0], "coordinator", "subcommand")
    check.eq(arg(c, "--listen"), "0.0.0.0:50051", "--listen (the public API)")
    check.eq(arg(c, "--cluster-listen"), "0.0.0.0:50052", "--cluster-listen (the cluster protocol)")
    check.eq(arg(c, "--id"), "auto", "--id auto")
    check.eq(arg(c, "--advertise"), f"$(POD_NAME).{HEADLESS}.{NAMESPACE}.svc.cluster.local:50052",
             "--advertise is the pod's stable DNS name at the cluster port")
    check.eq(arg(c, "--data-dir"), "/var/lib/tessera/raft", "--data-dir")
    check.eq(arg(c, "--model"), "smollm2-135m-instruct", "--model")
    check.eq(arg(c, "--min-workers"), "2", "--min-workers")
    check.eq(arg(c, "--http-listen"), "0.0.0.0:8000", "--http-listen (the OpenAI HTTP API)")
    env = {e["name"]: e for e in c["env"]}
    check.eq(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name", "POD_NAME from the downward API")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    check.eq(mounts.get("data"), arg(c, "--data-dir"), "--data-dir is on the claim")
    claims = spec["volumeClaimTemplates"]
    check.eq([v["metadata"]["name"] for v in claims], ["data"], "one claim template")
    check.eq(claims[0]["spec"]["resources"]["requests"]["storage"], "1Gi", "claim size")
    for kind in ("startupProbe", "livenessProbe"):
        probe = c.get(kind, {})
        check.eq(probe.get("grpc"), {"port": 50051, "service": ""}, f"{kind} is gRPC health on service \"\"")
    # Ready = a voter that knows its leader (the coordinator's VOTER_HEALTH).
    check.eq(c.get("readinessProbe", {}).get("grpc"), {"port": 50051, "service": "tessera.cluster.v1.Raft"},
             "readinessProbe asks for a voter that knows its leader")
    startup = c["startupProbe"]
    check(startup["periodSeconds"] * startup["failureThreshold"] >= 300,
          "startup probe allows at least 5 minutes for model loading")
    check.eq(c["ports"], [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                          {"name": "http", "containerPort": 8000, "protocol": "TCP"},
                          {"name": "cluster", "containerPort": 50052, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
             "the public gRPC, HTTP, cluster and metrics ports")


def test_peers_match_replicas() -> None:
    """Ensures that every coordinator's --peers names the founder alone (node 1, ordinal 0, at its
    headless DNS name) whatever the replicas — the others ask it to add them — and that workers
    know every coordinator, for 1..7 replicas."""
    for n in (1, 3, 5, 7):
        objects, _ = render(with_values(**{"coordinator.replicas": n}))
        sts = find(objects, "StatefulSet", COORD)
        check.eq(sts["spec"]["replicas"], n, f"replicas={n}")
        check.eq(arg(container(sts, "coordinator"), "--peers"), f"1={coordinator_host(0)}:50052",
                 f"--peers for {n} replicas: the founder (cluster port)")
        w = container(find(objects, "Deployment", WORKER), "worker")
        want_urls = ",".join(f"http://{coordinator_host(i)}:50052" for i in range(n))
        check.eq(arg(w, "--coordinator"), want_urls, f"workers know all {n} coordinators' cluster ports")
        pdb = find(objects, "PodDisruptionBudget", COORD)
        check.eq(pdb["spec"]["maxUnavailable"], 1, f"PDB maxUnavailable with {n} replicas")
        validate_all(objects)


def test_scale_hook() -> None:
    """Ensures that coordinator scale-up and scale-down work offline as rendered: 3 -> 5 -> 3
    changes the StatefulSet's replicas and the pre-upgrade hook's wanted voters and endpoints,
    never a pod's --peers (pods beyond the founder ask it to add them), the hook removes only
    (`--only=remove`: before a scale-down's pods go) with the operator's certificate, a scaled
    -away member's claim is deleted (it would come back with a stale log), and the Job validates."""
    seen_peers = set()
    for n in (3, 5, 3):
        objects, _ = render(with_values(**{"coordinator.replicas": n}))
        validate_all(objects)
        sts = find(objects, "StatefulSet", COORD)
        check.eq(sts["spec"]["replicas"], n, f"replicas {n}")
        seen_peers.add(arg(container(sts, "coordinator"), "--peers"))
        check.eq(sts["spec"]["persistentVolumeClaimRetentionPolicy"], {"whenDeleted": "Retain", "whenScaled": "Delete"},
                 "a scaled-away member's Raft data goes with it")
        job = find(objects, "Job", SCALE_JOB)
        meta = job["metadata"]["annotations"]
        check.eq(meta["helm.sh/hook"], "pre-upgrade", "runs before the upgrade deletes pods")
        check.eq(meta["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded", "hook delete policy")
        pod = job["spec"]["template"]["spec"]
        check.eq(pod["restartPolicy"], "Never", "a Job's pod")
        c = container(job, "scale")
        check.eq(c["args"][:2], ["cluster", "scale"], "runs tessera cluster scale")
        check.eq(arg(c, "--voters"), ",".join(f"{i + 1}={coordinator_host(i)}:50052" for i in range(n)),
                 f"wants exactly the {n} voters")
        check.eq(arg(c, "--endpoint"), ",".join(f"{coordinator_host(i)}:50052" for i in range(n)),
                 f"asks any of the {n} coordinators")
        check.eq(arg(c, "--only"), "remove", "removes only (new pods join by themselves)")
        check.eq((arg(c, "--certs"), arg(c, "--as")), (CERTS, "operator"), "as the operator")
        check.eq(tls_items(job), {"tessera-cluster-tls": [("ca.pem", "ca.pem"), ("admin-operator.pem", "admin-operator.pem"),
                                                          ("admin-operator.key", "admin-operator.key")]},
                 "the operator's files alone")
        check(pod.get("securityContext", {}).get("runAsNonRoot") is True, "the Job runs as non-root")
    check.eq(len(seen_peers), 1, f"--peers never changes with the replicas: {seen_peers}")
    objects, _ = render(with_values(**{"clusterTls.mode": "insecure"}))
    c = container(find(objects, "Job", SCALE_JOB), "scale")
    check("--insecure-cluster" in c["args"] and arg(c, "--certs") is None, "insecure: no certificates")
    check("volumes" not in find(objects, "Job", SCALE_JOB)["spec"]["template"]["spec"], "insecure: no volumes")


def test_schema_rejects_even_replicas() -> None:
    """Ensures that values.schema.json rejects an even (or zero) coordinator count, in validation and render."""
    with helm.Chart.load(CHART) as chart:
        for n in (0, 2, 4, 6, 8):
            values = with_values(**{"coordinator.replicas": n})
            try:
                chart.validate_schema(values)
                check(False, f"schema accepted coordinator.replicas={n}")
            except helm.HelmValuesError as e:
                check("/coordinator/replicas" in str(e), f"replicas={n} rejected naming the field: {e}")
            try:
                chart.render(values, name=RELEASE, namespace=NAMESPACE)
                check(False, f"render accepted coordinator.replicas={n}")
            except helm.HelmValuesError:
                check(True, "")
        for n in (1, 3, 5, 7):
            chart.validate_schema(with_values(**{"coordinator.replicas": n}))
            check(True, "")
        for bad in [with_values(**{"coordinator.replicas": "3"}), with_values(**{"model.source": "s3"}),
                    with_values(**{"model.source": "pvc"}), with_values(**{"worker.gpus": -1}),
                    with_values(**{"coordinator.replicass": 3}),
                    with_values(**{"coordinator.clusterPort": 0}),
                    with_values(**{"coordinator.httpPort": 0}), with_values(**{"coordinator.httpPort": 65536}),
                    with_values(**{"coordinator.httpPort": "8000"}), with_values(**{"coordinator.httpPort": None})]:
            try:
                chart.validate_schema(bad)
                check(False, f"schema accepted {bad}")
            except helm.HelmValuesError:
                check(True, "")


def test_services() -> None:
    """Ensures that the headless Service publishes not-ready addresses and carries only the cluster
    port (no HTTP), and that the client Service exposes the public gRPC (50051) and HTTP (8000)
    ports, with or without metrics."""
    objects, _ = render({})
    headless = find(objects, "Service", HEADLESS)["spec"]
    check.eq(headless["clusterIP"], "None", "headless")
    check.eq(headless.get("publishNotReadyAddresses"), True, "publishNotReadyAddresses")
    check.eq([(p["name"], p["port"], p["targetPort"]) for p in headless["ports"]], [("cluster", 50052, "cluster")],
             "the headless Service carries the cluster port only")
    sts = find(objects, "StatefulSet", COORD)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    check(all(pod_labels.get(k) == v for k, v in headless["selector"].items()), "headless selects coordinators")
    client = find(objects, "Service", CLIENT)["spec"]
    check.eq(client["type"], "ClusterIP", "client Service type")
    check.eq([(p["name"], p["port"], p["targetPort"]) for p in client["ports"]],
             [("grpc", 50051, "grpc"), ("http", 8000, "http")], "client Service exposes the gRPC and HTTP APIs only")
    check.eq([p.get("appProtocol") for p in client["ports"]], ["grpc", "http"], "client Service appProtocols")
    objects, _ = render(with_values(**{"metrics.serviceMonitor.enabled": True}))
    client = find(objects, "Service", CLIENT)["spec"]
    check.eq([(p["name"], p["targetPort"]) for p in client["ports"]],
             [("grpc", "grpc"), ("http", "http"), ("metrics", "metrics")],
             "with a ServiceMonitor, the client Service adds metrics, never the cluster port")
    check.eq(client["selector"], headless["selector"], "client Service selects coordinators only")
    check(not client.get("publishNotReadyAddresses"), "client Service routes to ready pods only")
    check.eq(sts["spec"]["selector"]["matchLabels"], headless["selector"], "StatefulSet selector")


def test_pdb() -> None:
    """Ensures that the PodDisruptionBudgets allow one coordinator and one worker down at a time,
    select their own pods, and can each be turned off."""
    objects, _ = render({})
    for name, kind, what in ((COORD, "StatefulSet", "coordinators"), (WORKER, "Deployment", "workers")):
        pdb = find(objects, "PodDisruptionBudget", name)
        check.eq(pdb["apiVersion"], "policy/v1", f"{what} PDB apiVersion")
        check.eq(pdb["spec"]["maxUnavailable"], 1, f"{what} maxUnavailable")
        check("minAvailable" not in pdb["spec"], f"{what}: no minAvailable alongside maxUnavailable")
        owner = find(objects, kind, name)
        check.eq(pdb["spec"]["selector"]["matchLabels"], owner["spec"]["selector"]["matchLabels"],
                 f"PDB selects the {what}")
    objects, _ = render(with_values(**{"coordinator.podDisruptionBudget.enabled": False}))
    check.eq([o["metadata"]["name"] for o in objects if o["kind"] == "PodDisruptionBudget"], [WORKER],
             "coordinator PDB disabled")
    objects, _ = render(with_values(**{"worker.podDisruptionBudget.enabled": False,
                                       "worker.podDisruptionBudget.maxUnavailable": 2}))
    check.eq([o["metadata"]["name"] for o in objects if o["kind"] == "PodDisruptionBudget"], [COORD],
             "worker PDB disabled")


def test_gpu_resources() -> None:
    """Ensures that nvidia.com/gpu is a worker limit when gpus > 0 and absent everywhere when 0."""
    objects, notes = render({})
    w = container(find(objects, "Deployment", WORKER), "worker")
    check("nvidia.com/gpu" not in str(objects), "no GPU resource with worker.gpus=0")
    check.eq(w["resources"]["limits"], {"memory": "3Gi"}, "CPU worker limits")
    for n in (1, 4):
        objects, notes = render(with_values(**{"worker.gpus": n}))
        validate_all(objects)
        w = container(find(objects, "Deployment", WORKER), "worker")
        check.eq(w["resources"]["limits"].get("nvidia.com/gpu"), n, f"nvidia.com/gpu limit {n}")
        check.eq(w["resources"]["limits"].get("memory"), "3Gi", "memory limit kept next to GPUs")
        check("nvidia.com/gpu" not in str(find(objects, "StatefulSet", COORD)), "coordinators get no GPU")
        check(f"{n} GPU(s)" in notes, "NOTES mention GPUs")
    # No resources at all (null removes the default) and no GPUs: the key is left out, not empty.
    objects, _ = render(with_values(**{"worker.resources": None}))
    check("resources" not in container(find(objects, "Deployment", WORKER), "worker"), "no empty resources")
    objects, _ = render(with_values(**{"worker.resources": None, "worker.gpus": 2}))
    check.eq(container(find(objects, "Deployment", WORKER), "worker")["resources"],
             {"limits": {"nvidia.com/gpu": 2}}, "GPU limit without other resources")


def test_anti_affinity() -> None:
    """Ensures that coordinators and workers spread over nodes: preferred by default, required or none on request."""
    objects, _ = render({})
    for kind, name, comp in (("StatefulSet", COORD, "coordinator"), ("Deployment", WORKER, "worker")):
        aff = find(objects, kind, name)["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        terms = aff["preferredDuringSchedulingIgnoredDuringExecution"]
        check.eq(len(terms), 1, f"{comp}: one preferred term")
        term = terms[0]["podAffinityTerm"]
        check.eq(term["topologyKey"], "kubernetes.io/hostname", f"{comp}: spread by host")
        check.eq(term["labelSelector"]["matchLabels"].get("app.kubernetes.io/component"), comp,
                 f"{comp}: repels its own component")
        check("requiredDuringSchedulingIgnoredDuringExecution" not in aff, f"{comp}: not required by default")
    objects, _ = render(with_values(**{"coordinator.podAntiAffinity": "required", "worker.podAntiAffinity": "none"}))
    validate_all(objects)
    spec = find(objects, "StatefulSet", COORD)["spec"]["template"]["spec"]
    check("requiredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["podAntiAffinity"], "required")
    check("affinity" not in find(objects, "Deployment", WORKER)["spec"]["template"]["spec"], "none")
    node_aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["llm"]}]}]}}}
    objects, _ = render(with_values(**{
        "worker.affinity": node_aff, "worker.nodeSelector": {"gpu": "h100"},
        "worker.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}))
    validate_all(objects)
    spec = find(objects, "Deployment", WORKER)["spec"]["template"]["spec"]
    check("nodeAffinity" in spec["affinity"] and "podAntiAffinity" in spec["affinity"], "user affinity merged with preset")
    check.eq(spec["nodeSelector"], {"gpu": "h100"}, "nodeSelector")
    check.eq(spec["tolerations"][0]["key"], "nvidia.com/gpu", "tolerations")


def test_workers() -> None:
    """Ensures that workers advertise their pod IP, carry their sizing flags and gRPC probes."""
    objects, _ = render(with_values(**{"worker.replicas": 5, "worker.threads": 8, "worker.memory": "12GiB"}))
    dep = find(objects, "Deployment", WORKER)
    check.eq(dep["spec"]["replicas"], 5, "worker replicas")
    w = container(dep, "worker")
    check.eq(w["args"][0], "worker", "subcommand")
    check.eq(arg(w, "--listen"), "0.0.0.0:50061", "--listen")
    check.eq(arg(w, "--advertise"), "$(POD_IP):50061", "--advertise")
    check.eq(arg(w, "--threads"), "8", "--threads")
    check.eq(arg(w, "--memory"), "12GiB", "--memory")
    env = {e["name"]: e for e in w["env"]}
    check.eq(env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP", "POD_IP from the downward API")
    # The worker port speaks mutual TLS: the probes ask the plain-text health port.
    check.eq(arg(w, "--health-listen"), "0.0.0.0:50062", "--health-listen")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        check.eq(w.get(kind, {}).get("grpc"), {"port": 50062, "service": ""}, f"worker {kind} is gRPC")


def test_security() -> None:
    """Ensures that every container runs as non-root, read-only, with all capabilities dropped."""
    objects, _ = render({})
    for obj in objects:
        if obj["kind"] not in ("StatefulSet", "Deployment"):
            continue
        pod = obj["spec"]["template"]["spec"]
        check.eq(pod["securityContext"].get("runAsNonRoot"), True, f"{obj['kind']} runAsNonRoot")
        check.eq(pod.get("automountServiceAccountToken"), False, f"{obj['kind']} no API token")
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            check.eq(sc.get("readOnlyRootFilesystem"), True, f"{c['name']} readOnlyRootFilesystem")
            check.eq(sc.get("capabilities", {}).get("drop"), ["ALL"], f"{c['name']} drops ALL")
            check.eq(sc.get("allowPrivilegeEscalation"), False, f"{c['name']} no privilege escalation")
            check(c["image"] == "tessera:0.1.0", f"{c['name']} image pinned to appVersion: {c['image']}")


def test_model_source() -> None:
    """Ensures that the model comes from an init-container pull by default, or read-only from an existing PVC."""
    objects, _ = render({})
    for kind, name in (("StatefulSet", COORD), ("Deployment", WORKER)):
        pod = find(objects, kind, name)["spec"]["template"]["spec"]
        init = pod["initContainers"]
        check.eq([c["name"] for c in init], ["model-pull"], f"{kind}: pull init container")
        check.eq(init[0]["args"], ["model", "pull", "smollm2-135m-instruct"], f"{kind}: tessera model pull")
        vols = {v["name"]: v for v in pod["volumes"]}
        check("emptyDir" in vols["model"], f"{kind}: model on an emptyDir")
        mounts = {m["name"]: m for m in init[0]["volumeMounts"]}
        check.eq(mounts["model"]["mountPath"], "/var/lib/tessera/home", f"{kind}: init writes TESSERA_HOME")
    objects, _ = render(with_values(**{"model.source": "pvc", "model.pvc.claimName": "models"}))
    validate_all(objects)
    for kind, name in (("StatefulSet", COORD), ("Deployment", WORKER)):
        pod = find(objects, kind, name)["spec"]["template"]["spec"]
        check("initContainers" not in pod, f"{kind}: nothing pulled with a PVC")
        vols = {v["name"]: v for v in pod["volumes"]}
        check.eq(vols["model"].get("persistentVolumeClaim"), {"claimName": "models", "readOnly": True},
                 f"{kind}: existing claim, read-only")
        c = pod["containers"][0]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
        check.eq(mount.get("readOnly"), True, f"{kind}: model mounted read-only")


def test_service_monitor() -> None:
    """Ensures that the optional ServiceMonitor scrapes the metrics port of coordinators and workers."""
    objects, _ = render(with_values(**{"metrics.serviceMonitor.enabled": True}))
    validate_all(objects)
    sm = find(objects, "ServiceMonitor", CLIENT)
    check.eq(sm["apiVersion"], "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    check.eq([e["port"] for e in sm["spec"]["endpoints"]], ["metrics"], "scrapes the metrics port")
    selected = [o for o in objects if o["kind"] == "Service" and all(
        o["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())]
    check.eq(sorted(o["metadata"]["name"] for o in selected), sorted([CLIENT, WORKER]),
             "selects the client and worker Services (not the headless one twice)")
    for svc in selected:
        check("metrics" in [p["name"] for p in svc["spec"]["ports"]], f"{svc['metadata']['name']} has a metrics port")
    for kind, name, want in (("StatefulSet", COORD, ["grpc", "http", "cluster", "metrics"]),
                             ("Deployment", WORKER, ["grpc", "peer", "health", "metrics"])):
        ports = [p["name"] for p in find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]["ports"]]
        check.eq(ports, want, f"{kind} ports")


def test_metrics_ports() -> None:
    """Ensures that coordinators and workers both serve metrics on metrics.port and declare it."""
    objects, _ = render(with_values(**{"metrics.port": 9464}))
    validate_all(objects)
    for kind, name in (("StatefulSet", COORD), ("Deployment", WORKER)):
        c = find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]
        check.eq(arg(c, "--metrics-listen"), "0.0.0.0:9464", f"{kind} --metrics-listen")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        check.eq(ports.get("metrics"), 9464, f"{kind} declares its metrics port without a ServiceMonitor")


def test_otlp_endpoint() -> None:
    """Ensures that otlp.endpoint becomes OTEL_EXPORTER_OTLP_ENDPOINT on coordinators and workers,
    that nothing is set by default, and that the schema refuses an endpoint without a scheme."""
    def otlp_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for kind, name, c in (("StatefulSet", COORD, "coordinator"), ("Deployment", WORKER, "worker")):
            env = {e["name"]: e.get("value") for e in container(find(objects, kind, name), c)["env"]}
            out[kind] = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return out

    objects, _ = render({})
    check.eq(otlp_env(objects), {"StatefulSet": None, "Deployment": None}, "no export by default")
    url = "http://otel-collector.observability:4317"
    objects, _ = render(with_values(**{"otlp.endpoint": url}))
    validate_all(objects)
    check.eq(otlp_env(objects), {"StatefulSet": url, "Deployment": url}, "endpoint passed as env")
    with helm.Chart.load(CHART) as chart:
        try:
            chart.validate_schema(with_values(**{"otlp.endpoint": "otel-collector:4317"}))
            check(False, "an endpoint without http:// or https:// must be refused")
        except helm.HelmValuesError as e:
            check("/otlp/endpoint" in str(e), f"the error names the field: {e}")


def test_cluster_port() -> None:
    """Ensures that coordinator.clusterPort moves every cluster address (--cluster-listen, --advertise,
    --peers, the workers' --coordinator, the headless Service and the container port) and nothing
    public, and that a clusterPort equal to the public port fails the render."""
    objects, _ = render(with_values(**{"coordinator.clusterPort": 7000}))
    validate_all(objects)
    c = container(find(objects, "StatefulSet", COORD), "coordinator")
    check.eq(arg(c, "--cluster-listen"), "0.0.0.0:7000", "--cluster-listen")
    check.eq(arg(c, "--listen"), "0.0.0.0:50051", "--listen unchanged")
    check(str(arg(c, "--advertise")).endswith(":7000"), "--advertise at the cluster port")
    check.eq(arg(c, "--peers"), f"1={coordinator_host(0)}:7000", "--peers")
    job = container(find(objects, "Job", SCALE_JOB), "scale")
    check.eq(arg(job, "--voters"), ",".join(f"{i + 1}={coordinator_host(i)}:7000" for i in range(3)),
             "the scale hook's --voters on the cluster port")
    w = container(find(objects, "Deployment", WORKER), "worker")
    check.eq(arg(w, "--coordinator"), ",".join(f"http://{coordinator_host(i)}:7000" for i in range(3)),
             "workers dial the cluster port")
    check.eq({p["name"]: p["containerPort"] for p in c["ports"]}.get("cluster"), 7000, "container port")
    check.eq([p["port"] for p in find(objects, "Service", HEADLESS)["spec"]["ports"]], [7000], "headless port")
    check.eq([p["port"] for p in find(objects, "Service", CLIENT)["spec"]["ports"]], [50051, 8000], "client ports")
    try:
        render(with_values(**{"coordinator.clusterPort": 50051}))
        check(False, "render accepted clusterPort == port")
    except Exception as e:  # noqa: BLE001 - the SDK's error type for a template `fail`
        check("clusterPort must differ" in str(e), f"the error names the rule: {e}")


def test_http_port() -> None:
    """Ensures that coordinator.httpPort moves --http-listen, the container port `http` and the
    client Service's http port, never reaches the headless Service, shows in NOTES, and that a
    port equal to another coordinator listener fails the render."""
    objects, notes = render(with_values(**{"coordinator.httpPort": 8080}))
    validate_all(objects)
    c = container(find(objects, "StatefulSet", COORD), "coordinator")
    check.eq(arg(c, "--http-listen"), "0.0.0.0:8080", "--http-listen")
    check.eq(arg(c, "--listen"), "0.0.0.0:50051", "--listen unchanged")
    check.eq({p["name"]: p["containerPort"] for p in c["ports"]}.get("http"), 8080, "container port http")
    client = find(objects, "Service", CLIENT)["spec"]["ports"]
    check.eq([(p["name"], p["port"], p["targetPort"]) for p in client if p["name"] == "http"],
             [("http", 8080, "http")], "client Service http port")
    headless = find(objects, "Service", HEADLESS)["spec"]["ports"]
    check(all(p["name"] != "http" and p["port"] != 8080 for p in headless),
          f"the headless Service (peers only) has no HTTP port: {headless}")
    check(f"8080:8080" in notes and "http://127.0.0.1:8080/v1/chat/completions" in notes, "NOTES use httpPort")
    w = container(find(objects, "Deployment", WORKER), "worker")
    check(arg(w, "--http-listen") is None, "workers serve no HTTP API")
    for key, other in (("coordinator.port", 8080), ("coordinator.clusterPort", 8080), ("metrics.port", 8080)):
        try:
            render(with_values(**{"coordinator.httpPort": 8080, key: other}))
            check(False, f"render accepted httpPort == {key}")
        except Exception as e:  # noqa: BLE001 - the SDK's error type for a template `fail`
            check("httpPort must differ" in str(e), f"httpPort == {key}: the error names the rule: {e}")


def test_api_keys() -> None:
    """Ensures that apiKeys.existingSecret gives coordinators (only) TESSERA_API_KEYS from that
    Secret's key, that nothing is set by default, and that the schema refuses bad names."""
    def keys_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for kind, name, c in (("StatefulSet", COORD, "coordinator"), ("Deployment", WORKER, "worker")):
            env = {e["name"]: e for e in container(find(objects, kind, name), c)["env"]}
            out[kind] = env.get("TESSERA_API_KEYS")
        return out

    objects, _ = render({})
    check.eq(keys_env(objects), {"StatefulSet": None, "Deployment": None}, "no API keys by default")
    objects, notes = render(with_values(**{"apiKeys.existingSecret": "tessera-api-keys"}))
    validate_all(objects)
    ref = {"secretKeyRef": {"name": "tessera-api-keys", "key": "api-keys"}}
    check.eq(keys_env(objects), {"StatefulSet": {"name": "TESSERA_API_KEYS", "valueFrom": ref}, "Deployment": None},
             "coordinators read the keys from the Secret, workers get none")
    check('-H "Authorization: Bearer $TESSERA_API_KEY"' in notes, "NOTES: the curl sends the key")
    check("get secret tessera-api-keys" in notes and "{.data.api-keys}" in notes, "NOTES: where the key is")
    check("send $TESSERA_API_KEY" in notes, "NOTES: the tessera CLI sends the exported key")
    objects, _ = render(with_values(**{"apiKeys.existingSecret": "keys", "apiKeys.secretKey": "tokens.csv"}))
    check.eq(keys_env(objects)["StatefulSet"]["valueFrom"], {"secretKeyRef": {"name": "keys", "key": "tokens.csv"}},
             "apiKeys.secretKey names the Secret's key")
    with helm.Chart.load(CHART) as chart:
        for bad in [with_values(**{"apiKeys.existingSecret": "Bad_Name"}), with_values(**{"apiKeys.secretKey": ""}),
                    with_values(**{"apiKeys.secretKey": "a/b"}), with_values(**{"apiKeys.keys": "k1"})]:
            try:
                chart.validate_schema(bad)
                check(False, f"schema accepted {bad}")
            except helm.HelmValuesError as e:
                check("/apiKeys" in str(e) or "apiKeys" in str(e), f"{bad} rejected naming apiKeys: {e}")


CERTS = "/var/lib/tessera/certs"


def tls_items(workload: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """The cluster-tls projected volume of a workload: Secret name -> [(key, path)]."""
    vols = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    if "cluster-tls" not in vols:
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    for src in vols["cluster-tls"]["projected"]["sources"]:
        sec = src["secret"]
        out.setdefault(sec["name"], []).extend((i["key"], i["path"]) for i in sec["items"])
    return out


def test_cluster_tls_secret() -> None:
    """Ensures that by default every coordinator and worker runs the cluster protocol on
    certificates from the `tessera-cluster-tls` Secret: coordinators get the CA and every
    coordinator's files (each picks its own by --id), workers the CA and the one worker
    certificate (and register under its name); nobody gets the CA key or another role's key."""
    objects, _ = render(with_values(**{"coordinator.replicas": 5}))
    validate_all(objects)
    sts = find(objects, "StatefulSet", COORD)
    c = container(sts, "coordinator")
    check.eq(arg(c, "--certs"), CERTS, "coordinator --certs")
    check("--insecure-cluster" not in c["args"], "coordinators are not insecure")
    want = [("ca.pem", "ca.pem")] + [(f"coordinator-{i}.{e}", f"coordinator-{i}.{e}") for i in range(1, 6) for e in ("pem", "key")]
    check.eq(tls_items(sts), {"tessera-cluster-tls": want}, "coordinator certificate files")
    check({"name": "cluster-tls", "mountPath": CERTS, "readOnly": True} in c["volumeMounts"], "coordinator mount")
    dep = find(objects, "Deployment", WORKER)
    w = container(dep, "worker")
    check.eq(arg(w, "--certs"), CERTS, "worker --certs")
    check.eq(arg(w, "--name"), "pool", "workers take their certificate's name")
    check.eq(arg(w, "--peer-listen"), "0.0.0.0:50063", "a fixed peer port")
    check.eq(tls_items(dep), {"tessera-cluster-tls": [("ca.pem", "ca.pem"), ("worker-pool.pem", "worker-pool.pem"),
                                                      ("worker-pool.key", "worker-pool.key")]},
             "worker certificate files")
    keys = [k for items in (tls_items(sts), tls_items(dep)) for lst in items.values() for k, _ in lst]
    check("ca.key" not in keys, "no pod gets the CA key")
    objects, _ = render(with_values(**{"clusterTls.secret.name": "my-certs", "clusterTls.workerName": "gpu"}))
    dep = find(objects, "Deployment", WORKER)
    check.eq(list(tls_items(dep)), ["my-certs"], "clusterTls.secret.name")
    check.eq(arg(container(dep, "worker"), "--name"), "gpu", "clusterTls.workerName")
    with helm.Chart.load(CHART) as chart:
        for bad in [with_values(**{"clusterTls.mode": "off"}), with_values(**{"clusterTls.workerName": "Pool_1"}),
                    with_values(**{"clusterTls.mode": "certManager"})]:
            try:
                chart.validate_schema(bad)
                check(False, f"schema accepted {bad}")
            except helm.HelmValuesError as e:
                check("clusterTls" in str(e), f"{bad} rejected naming clusterTls: {e}")


def test_cluster_tls_cert_manager() -> None:
    """Ensures that clusterTls.mode=certManager requests one Certificate per coordinator (its
    Raft id in its names) and one for the workers from the issuer, and mounts their Secrets under
    the file names `tessera certs` uses."""
    issuer = {"name": "tessera-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    objects, _ = render(with_values(**{"clusterTls.mode": "certManager", "clusterTls.certManager.issuerRef": issuer}))
    validate_all(objects)
    certs = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Certificate"}
    check.eq(sorted(certs), [f"{RELEASE}-tessera-admin"] + [f"{RELEASE}-tessera-coordinator-{i}" for i in (1, 2, 3)]
             + [f"{RELEASE}-tessera-worker"], "Certificates")
    admin = next(o for o in objects if o["kind"] == "Certificate" and o["metadata"]["name"] == f"{RELEASE}-tessera-admin")
    check.eq(admin["spec"]["dnsNames"], ["operator.admin.tessera.internal"], "the scale hook's operator identity")
    check.eq(set(admin["spec"]["usages"]), {"digital signature", "client auth"}, "operator usages: a client only")
    check.eq(admin["metadata"]["annotations"]["helm.sh/hook"], "pre-upgrade",
             "issued as a hook, before the scale Job that needs it")
    check(int(admin["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0, "weighted before the Job")
    check.eq(tls_items(find(objects, "Job", SCALE_JOB)),
             {f"{RELEASE}-tessera-admin-tls": [("ca.crt", "ca.pem"), ("tls.crt", "admin-operator.pem"),
                                               ("tls.key", "admin-operator.key")]}, "the scale Job's Secret")
    c2 = certs[f"{RELEASE}-tessera-coordinator-2"]
    check.eq(c2["dnsNames"], ["2.coordinator.tessera.internal", "coordinator.tessera.internal"], "coordinator 2 names")
    check.eq(c2["issuerRef"], issuer, "issuerRef")
    check.eq(set(c2["usages"]), {"digital signature", "server auth", "client auth"}, "usages")
    wc = certs[f"{RELEASE}-tessera-worker"]
    check.eq(wc["dnsNames"], ["pool.worker.tessera.internal", "worker.tessera.internal"], "worker names")
    sts = find(objects, "StatefulSet", COORD)
    items = tls_items(sts)
    check.eq(items[f"{RELEASE}-tessera-coordinator-1-tls"],
             [("ca.crt", "ca.pem"), ("tls.crt", "coordinator-1.pem"), ("tls.key", "coordinator-1.key")],
             "coordinator 1's Secret and the CA")
    check.eq(items[f"{RELEASE}-tessera-coordinator-3-tls"],
             [("tls.crt", "coordinator-3.pem"), ("tls.key", "coordinator-3.key")], "coordinator 3's Secret")
    dep = find(objects, "Deployment", WORKER)
    check.eq(tls_items(dep), {f"{RELEASE}-tessera-worker-tls": [("ca.crt", "ca.pem"), ("tls.crt", "worker-pool.pem"),
                                                                ("tls.key", "worker-pool.key")]},
             "the workers' Secret")


def test_cluster_tls_insecure() -> None:
    """Ensures that clusterTls.mode=insecure passes --insecure-cluster, mounts no certificates,
    and probes the worker port itself (which then speaks plain gRPC)."""
    objects, _ = render(with_values(**{"clusterTls.mode": "insecure"}))
    validate_all(objects)
    sts = find(objects, "StatefulSet", COORD)
    dep = find(objects, "Deployment", WORKER)
    for workload, name in ((sts, "coordinator"), (dep, "worker")):
        c = container(workload, name)
        check("--insecure-cluster" in c["args"], f"{name}: --insecure-cluster")
        check(arg(c, "--certs") is None, f"{name}: no --certs")
        check.eq(tls_items(workload), {}, f"{name}: no certificate volume")
    w = container(dep, "worker")
    check.eq(w["readinessProbe"]["grpc"]["port"], 50061, "probes on the worker port")
    check.eq(arg(w, "--name"), "$(POD_NAME)", "workers named by their pod")
    check(not [o for o in objects if o["kind"] == "Certificate"], "no Certificates")


def test_network_policy() -> None:
    """Ensures that NetworkPolicies admit only the release's coordinator and worker pods to the
    cluster protocol (coordinators' cluster port, workers' port and peer port) and leave the
    public, HTTP, metrics and health ports open; none when disabled."""
    objects, _ = render({})
    pols = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    check.eq(sorted(pols), [COORD, WORKER], "one policy per component")
    def selectors(*comps: str) -> list[dict[str, Any]]:
        return [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tessera", "app.kubernetes.io/instance": RELEASE,
                                                 "app.kubernetes.io/component": comp}}} for comp in comps]

    def rules(spec: dict[str, Any]) -> tuple[set[int], set[int]]:
        # The coordinators' cluster port also admits the scale hook's Job (it removes members).
        members = selectors("coordinator", "worker", *(["coordinator-scale"] if spec is pols[COORD] else []))
        open_ports, member_ports = set(), set()
        for rule in spec["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if "from" in rule:
                check.eq(rule["from"], members, "only the release's coordinators, workers (and scale hook)")
                member_ports |= ports
            else:
                open_ports |= ports
        return open_ports, member_ports

    check.eq(rules(pols[COORD]), ({50051, 8000, 9090}, {50052}), "coordinator: open ports, members-only ports")
    check.eq(rules(pols[WORKER]), ({9090, 50062}, {50061, 50063}), "worker: open ports, members-only ports")
    check.eq(pols[COORD]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "coordinator", "selects coordinators")
    objects, _ = render(with_values(**{"networkPolicy.enabled": False}))
    check(not [o for o in objects if o["kind"] == "NetworkPolicy"], "none when disabled")


TESTS: list[Callable[[], None]] = [
    test_lint, test_defaults_validate_and_shape, test_coordinator_statefulset, test_peers_match_replicas, test_scale_hook,
    test_schema_rejects_even_replicas, test_services, test_pdb, test_gpu_resources, test_anti_affinity,
    test_workers, test_security, test_model_source, test_service_monitor, test_metrics_ports,
    test_otlp_endpoint, test_cluster_port, test_http_port, test_api_keys, test_cluster_tls_secret,
    test_cluster_tls_cert_manager, test_cluster_tls_insecure, test_network_policy,
]


def main() -> int:
    print(f"chart: {CHART} with Helm {helm.helm_sdk_version()}, Kubernetes schemas {KUBE_VERSION} (strict)")
    for test in TESTS:
        check.scope = test.__name__
        before = (check.passed, len(check.failed))
        try:
            test()
        except Exception:  # noqa: BLE001 - a crashing test is one failed check, the rest still run
            check(False, "raised:\n" + traceback.format_exc())
        passed, failed = check.passed - before[0], len(check.failed) - before[1]
        print(f"{'ok  ' if failed == 0 else 'FAIL'} {test.__name__}: {passed} checks" + (f", {failed} failed" if failed else ""))
    if check.failed:
        print(f"chart: {check.passed} checks passed, {len(check.failed)} failed")
        return 1
    print(f"chart: {check.passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
