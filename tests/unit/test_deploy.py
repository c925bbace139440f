"""The deployment files under deploy/: systemd unit, Kubernetes manifests and
the plain Prometheus configuration. One port everywhere, and it is
exporters.config.DEFAULT_PORT.

promtool comes from Debian's prometheus package, which
`scripts/install.sh --test` installs; without it the promtool test fails.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from exporters.config import parse_config, parse_listen
from tests.unit.promtool import promtool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "anontrace.service"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
SERVICE = DEPLOY / "kubernetes" / "service.yaml"
SERVICEMONITOR = DEPLOY / "kubernetes" / "servicemonitor.yaml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "anontrace.rules.yml"
CONFIG_EXAMPLE = DEPLOY / "anontrace.yaml"

APP = {"app.kubernetes.io/name": "anontrace"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(path)}


def unit_directives(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in order (systemd keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        assert section is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out




# --- Kubernetes -----------------------------------------------------------------------

def test_kubernetes_manifests_parse_with_expected_kinds() -> None:
    assert [d["kind"] for d in docs(DAEMONSET)] == ["Namespace", "ConfigMap", "DaemonSet"]
    assert [d["kind"] for d in docs(SERVICE)] == ["Service"]
    assert [d["kind"] for d in docs(SERVICEMONITOR)] == ["ServiceMonitor"]
    assert docs(SERVICEMONITOR)[0]["apiVersion"] == "monitoring.coreos.com/v1"
    for path in (DAEMONSET, SERVICE, SERVICEMONITOR):
        for d in docs(path):
            if d["kind"] == "Namespace":
                assert d["metadata"]["name"] == "anontrace"
            else:
                assert d["metadata"]["namespace"] == "anontrace", (path.name, d["kind"])


def daemonset_pod() -> dict:
    return by_kind(DAEMONSET)["DaemonSet"]["spec"]["template"]


def test_daemonset_can_trace_the_node() -> None:
    ds = by_kind(DAEMONSET)["DaemonSet"]
    pod = daemonset_pod()
    spec = pod["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["hostPID"] is True
    assert {"operator": "Exists"} in spec["tolerations"]  # every node, tainted or not
    (container,) = spec["containers"]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path, read_only in (("/sys/kernel/debug", False), ("/sys/kernel/tracing", False),
                            ("/sys/fs/bpf", False), ("/lib/modules", True),
                            ("/usr/src", True)):
        mount = mounts[path]
        assert mount.get("readOnly", False) is read_only, path
        assert volumes[mount["name"]]["hostPath"]["path"] == path
    # the config the container is started with is valid
    args = container["args"]
    assert args[0] == "serve"
    config_path = args[args.index("--config") + 1]
    config_mount = mounts[str(Path(config_path).parent)]
    cm_name = volumes[config_mount["name"]]["configMap"]["name"]
    cm = by_kind(DAEMONSET)["ConfigMap"]
    assert cm["metadata"]["name"] == cm_name
    parse_config(cm["data"][Path(config_path).name], "ConfigMap anontrace")


def test_daemonset_probes_and_resources() -> None:
    (container,) = daemonset_pod()["spec"]["containers"]
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/" and ready["port"] == "metrics"
    assert [p["name"] for p in container["ports"]] == ["metrics"]
    limits = container["resources"]["limits"]
    requests = container["resources"]["requests"]
    # From the measured peak (the comment above `resources:` gives the
    # figures, the date and the rule).
    assert limits["memory"] == "704Mi" and requests["memory"] == "256Mi"
    assert mebibytes(requests["memory"]) <= mebibytes(limits["memory"])
    text = DAEMONSET.read_text()
    assert "Memory, measured 20" in text and "VmHWM" in text


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_service_is_headless_and_selects_the_daemonset() -> None:
    svc = docs(SERVICE)[0]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= daemonset_pod()["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"


def test_servicemonitor_scrapes_the_service_port() -> None:
    sm = docs(SERVICEMONITOR)[0]
    svc = docs(SERVICE)[0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


# --- one port --------------------------------------------------------------------------

def deploy_ports() -> dict[str, int]:
    """Every place under deploy/ that names anontrace's port."""
    ports: dict[str, int] = {}
    env = dict(v.split("=", 1) for v in unit_directives()["Service"]["Environment"])
    ports["systemd Environment=ANONTRACE_LISTEN"] = parse_listen(env["ANONTRACE_LISTEN"])[1]

    (container,) = daemonset_pod()["spec"]["containers"]
    args = container["args"]
    ports["DaemonSet --listen"] = parse_listen(args[args.index("--listen") + 1])[1]
    for p in container["ports"]:
        ports[f"DaemonSet containerPort {p['name']}"] = p["containerPort"]
    for p in docs(SERVICE)[0]["spec"]["ports"]:
        ports[f"Service port {p['name']}"] = p["port"]

    prom = yaml.safe_load(PROM_CONFIG.read_text())
    for job in prom["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                ports[f"prometheus.yml {job['job_name']} {target}"] = int(target.rsplit(":", 1)[1])

    return ports


def test_one_port_in_every_deploy_file() -> None:
    ports = deploy_ports()
    assert len(set(ports.values())) == 1, ports
    # The comments name it too (prometheus.yml explains the choice).
    port = next(iter(ports.values()))
    assert f"Port {port}" in PROM_CONFIG.read_text()


def test_the_port_is_tracer_config_default_port() -> None:
    from exporters.config import DEFAULT_PORT

    ports = deploy_ports()
    # deploy/anontrace.yaml (the config example) too; test_config.py checks
    # it against DEFAULT_PORT on its own.
    ports["deploy/anontrace.yaml listen"] = parse_config(
        CONFIG_EXAMPLE.read_text(), str(CONFIG_EXAMPLE)).listen_address()[1]
    wrong = {where: p for where, p in ports.items() if p != DEFAULT_PORT}
    assert not wrong, f"exporters.config.DEFAULT_PORT is {DEFAULT_PORT}; deploy files say {wrong}"


# --- Prometheus configuration ------------------------------------------------------------

_RELABEL_ACTIONS = {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod", "labelmap",
                    "labeldrop", "labelkeep", "lowercase", "uppercase"}


def check_kubernetes_sd_job(job: dict) -> None:
    """What promtool would check of a kubernetes_sd_configs job, for a promtool
    built without Kubernetes discovery (Debian's)."""
    (sd,) = job["kubernetes_sd_configs"]
    assert set(sd) <= {"role", "namespaces", "selectors", "api_server", "kubeconfig_file",
                       "attach_metadata"}
    assert sd["role"] == "pod"
    assert sd["namespaces"]["names"] == ["anontrace"]
    for rule in job["relabel_configs"]:
        assert rule.get("action", "replace") in _RELABEL_ACTIONS, rule
        assert isinstance(rule.get("source_labels", []), list), rule
        re.compile(rule.get("regex", "(.*)"))
        if rule.get("action", "replace") == "replace":
            assert re.fullmatch(r"[a-zA-Z_]\w*", rule["target_label"]), rule
    keeps = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    # the pod label and the container port name of the DaemonSet
    assert keeps["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == APP[
        "app.kubernetes.io/name"] == daemonset_pod()["metadata"]["labels"]["app.kubernetes.io/name"]
    (container,) = daemonset_pod()["spec"]["containers"]
    assert keeps["__meta_kubernetes_pod_container_port_name"] == container["ports"][0]["name"]


def test_promtool_check_config(tmp_path: Path) -> None:
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    assert prom["rule_files"] == [RULES.name]  # relative to the config's directory
    kinds = {job["job_name"]: set(job) for job in prom["scrape_configs"]}
    assert any("static_configs" in k for k in kinds.values())
    assert any("kubernetes_sd_configs" in k for k in kinds.values())

    proc = promtool("check", "config", PROM_CONFIG)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        assert "SUCCESS" in out
        return
    # Debian's prometheus is built without Kubernetes discovery ("Kubernetes
    # support has been completely removed", its NEWS.Debian), so its promtool
    # rejects the key. Check everything else with promtool, with the job's
    # discovery swapped for file_sd (relabel_configs untouched), and the
    # Kubernetes part here.
    assert "field kubernetes_sd_configs not found" in out, out
    for job in prom["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            check_kubernetes_sd_job(job)
            del job["kubernetes_sd_configs"]
            job["file_sd_configs"] = [{"files": ["targets/*.json"]}]
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / PROM_CONFIG.name).write_text(yaml.safe_dump(prom, sort_keys=False))
    proc = promtool("check", "config", PROM_CONFIG.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


# --- systemd ---------------------------------------------------------------------------

def test_systemd_unit_runs_anontrace_serve() -> None:
    service = unit_directives()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/") and Path(argv[0]).name == "anontrace"
    assert argv[1] == "serve"
    assert argv[argv.index("--config") + 1] == "/etc/anontrace/anontrace.yaml"
    assert argv[argv.index("--listen") + 1] == "${ANONTRACE_LISTEN}"
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert unit_directives()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_keeps_what_bpf_needs() -> None:
    service = unit_directives()["Service"]
    caps = set(" ".join(service["CapabilityBoundingSet"]).split())
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"} <= caps
    assert "CAP_SYSLOG" in caps  # real /proc/kallsyms addresses
    # settings that would break BCC or the probes
    for key in ("ProtectKernelModules", "ProtectKernelTunables", "MemoryDenyWriteExecute",
                "PrivateDevices", "PrivateUsers", "ProtectKernelLogs", "SystemCallFilter",
                "DynamicUser"):
        assert service.get(key, ["no"])[-1] in ("no", "false"), key
    assert service["LimitMEMLOCK"] == ["infinity"]
    assert service["CacheDirectory"] == ["anontrace"]  # /var/cache/anontrace/headers


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    # The installed program and man page are not on a build machine: point
    # ExecStart at /bin/true and drop Documentation= for the check.
    text = UNIT.read_text()
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    text = re.sub(r"^Documentation=.*\n", "", text, flags=re.M)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    proc = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
