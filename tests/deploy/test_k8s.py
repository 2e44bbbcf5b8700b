"""Kubernetes manifests: schema-valid once rendered, and consistent with each other and the daemon."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import gen_prometheusrule
from tools.kustomize import render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
K8S_VERSION = "1.30"                 # the oldest Kubernetes we promise to run on
CRDS = {"ServiceMonitor", "PrometheusRule"}


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects: the checks assume one"
        kinds[obj["kind"]] = obj
    return kinds


def _container(sts: dict[str, Any]) -> dict[str, Any]:
    containers = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _subset(labels: dict[str, str], of: dict[str, str]) -> bool:
    return bool(labels) and all(of.get(k) == v for k, v in labels.items())


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> tuple[str, dict[str, dict[str, Any]]]:
    return request.param, _by_kind(render(K8S / request.param))


def test_layout_has_base_and_gpu_overlay():
    assert {"base", "overlays/gpu"} <= set(KUSTOMIZATIONS)


def test_every_object_matches_the_kubernetes_schema(rendered):
    import kubernetes_validate

    name, objects = rendered
    for kind, obj in objects.items():
        if kind in CRDS:
            continue  # no schema shipped: checked structurally below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {kind}/{obj['metadata']['name']} at {path}: {exc.message}")


def test_kubernetes_validate_rejects_a_broken_manifest():
    """The schema check above can fail: a misspelt field is an error in strict mode."""
    import kubernetes_validate

    sts = _by_kind(render(K8S / "base"))["StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_python_render_equals_kubectl_kustomize(name):
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / name)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    theirs = sorted((o for o in yaml.safe_load_all(proc.stdout) if o), key=key)
    assert sorted(render(K8S / name), key=key) == theirs


def test_trainer_is_one_stateful_replica_with_a_volume(rendered):
    _, objects = rendered
    sts = objects["StatefulSet"]
    assert sts["spec"]["replicas"] == 1, "one trainer learns from all data"
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in _container(sts)["volumeMounts"]}
    for mount_name in mounts.values():
        assert mount_name in claims or mount_name in volumes, f"volumeMount {mount_name} undefined"
    assert "emptyDir" in volumes[mounts["/tmp"]], "read-only root needs an emptyDir at /tmp"
    assert sts["spec"]["selector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()


def test_service_probes_and_monitor_point_at_the_container(rendered):
    _, objects = rendered
    sts, svc, mon = objects["StatefulSet"], objects["Service"], objects["ServiceMonitor"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    container = _container(sts)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"].get("clusterIP") == "None", "a StatefulSet's governing service is headless"
    assert _subset(svc["spec"]["selector"], pod_labels), "Service selects no trainer pod"
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ports or get["port"] in ports.values(), f"{probe} port"
    # ServiceMonitor (no schema available): structure and references by hand.
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert _subset(mon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    assert mon["spec"]["endpoints"], "no endpoints to scrape"
    for endpoint in mon["spec"]["endpoints"]:
        assert endpoint["port"] in svc_ports and endpoint.get("path", "/metrics") == "/metrics"
    pdb = objects["PodDisruptionBudget"]
    assert _subset(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_settings_come_from_real_gnpd_variables(rendered, settings_from_env, settings_env_names):
    _, objects = rendered
    sts, cm, secret = objects["StatefulSet"], objects["ConfigMap"], objects["Secret"]
    refs = {("ConfigMap", e["configMapRef"]["name"]) if "configMapRef" in e
            else ("Secret", e["secretRef"]["name"]) for e in _container(sts)["envFrom"]}
    assert refs == {("ConfigMap", cm["metadata"]["name"]), ("Secret", secret["metadata"]["name"])}
    env = {**cm["data"], **secret.get("stringData", {})}
    assert not set(cm["data"]) & set(secret.get("stringData", {})), "a key in both"
    secret_env = _secret_env(_container(sts))  # credentials from Secrets made outside git
    env.update({key: f"placeholder-{key.lower()}" for key in secret_env})
    unknown = set(env) - settings_env_names
    if unknown and unknown <= SECURITY_SETTINGS:
        pytest.skip(f"daemon.settings lacks {sorted(unknown)} (issue 8 item 5, ingest side)")
    assert not unknown, f"not daemon settings (typo?): {sorted(unknown)}"
    if "GNPD_KAFKA__SSL_CAFILE" in env:  # a mounted Secret; checked by the secure test
        env.pop("GNPD_KAFKA__SSL_CAFILE")
    settings = settings_from_env(env)  # raises on a value the daemon would refuse
    assert settings.kafka.bootstrap_servers, "empty would start the embedded test broker"
    container = _container(sts)
    assert settings.serve.host == "0.0.0.0"
    assert settings.serve.port in {p["containerPort"] for p in container["ports"]}
    data_mounts = [m["mountPath"] for m in container["volumeMounts"]
                   if m["name"] in {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}]
    for path in (settings.store.path, settings.model.path):
        assert any(Path(path).is_relative_to(m) for m in data_mounts), f"{path} not on the PVC"
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.train.stop_timeout_seconds + 10, "leave time to seal and commit"


def test_security_context(rendered):
    _, objects = rendered
    sts = objects["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    ctx = _container(sts)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and ctx["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001, "the Dockerfile's USER"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    assert pod["automountServiceAccountToken"] is False
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile


def test_gpu_overlay_requests_a_gpu_and_base_does_not():
    gpu = _container(_by_kind(render(K8S / "overlays/gpu"))["StatefulSet"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["resources"]["limits"]["memory"], "the patch must keep the base's limits"
    assert _by_kind(render(K8S / "overlays/gpu"))["ConfigMap"]["data"]["GNPD_TRAIN__DEVICE"] == "cuda"
    base = _container(_by_kind(render(K8S / "base"))["StatefulSet"])
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {})


def test_prometheusrule_matches_the_promtool_tested_alerts():
    rule = _by_kind(render(K8S / "base"))["PrometheusRule"]
    alerts = yaml.safe_load(gen_prometheusrule.ALERTS.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == alerts["groups"]
    assert gen_prometheusrule.main(["--check"]) == 0, "run python tools/gen_prometheusrule.py"


# ---- network policy and credentials (issue 8, item 5) ------------------------------------

SECURITY_SETTINGS = {"GNPD_KAFKA__SECURITY_PROTOCOL", "GNPD_KAFKA__SASL_MECHANISM",
                     "GNPD_KAFKA__SASL_USERNAME", "GNPD_KAFKA__SASL_PASSWORD",
                     "GNPD_KAFKA__SSL_CAFILE", "GNPD_SERVE__API_TOKEN"}
SECRET_LIKE = ("PASSWORD", "TOKEN", "SECRET")


def _port_matches(rule_port: dict[str, Any], port: int, names: dict[str, int]) -> bool:
    wanted = rule_port["port"]
    return (names.get(wanted) if isinstance(wanted, str) else wanted) == port


def networkpolicy_problems(objects: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the NetworkPolicy of one rendered kustomization (empty: nothing).

    Ingress: only the container's HTTP port, only from selected namespaces (never from
    everywhere). Egress: DNS on 53/UDP and 53/TCP, and every Kafka bootstrap host:port of
    the gnpd-kafka Secret reachable (its namespace from `<service>.<namespace>.svc...`),
    nothing else open.
    """
    policy, sts = objects.get("NetworkPolicy"), objects["StatefulSet"]
    if policy is None:
        return ["no NetworkPolicy"]
    problems = []
    spec = policy["spec"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    if not _subset(spec["podSelector"].get("matchLabels", {}), pod_labels):
        problems.append("podSelector does not select the trainer pod")
    if sorted(spec.get("policyTypes", [])) != ["Egress", "Ingress"]:
        problems.append(f"policyTypes {spec.get('policyTypes')}: need Ingress and Egress")
    ports = {p["name"]: p["containerPort"] for p in _container(sts)["ports"]}
    for rule in spec.get("ingress", []):
        if not rule.get("from") or not all("namespaceSelector" in f for f in rule["from"]):
            problems.append(f"ingress rule open to every namespace: {rule}")
        if not rule.get("ports") or not all(_port_matches(p, ports["http"], ports)
                                            for p in rule["ports"]):
            problems.append(f"ingress beyond the http port: {rule.get('ports')}")
    egress = spec.get("egress", [])
    if any(not rule.get("to") or not rule.get("ports") for rule in egress):
        problems.append("an egress rule without `to` or `ports` opens everything")

    def allowed(namespace: str | None, port: int, protocol: str = "TCP") -> bool:
        for rule in egress:
            namespaces = {t.get("namespaceSelector", {}).get("matchLabels", {})
                          .get("kubernetes.io/metadata.name") for t in rule.get("to", [])}
            if (namespace is None or namespace in namespaces) and any(
                    p["port"] == port and p.get("protocol", "TCP") == protocol
                    for p in rule.get("ports", [])):
                return True
        return False

    for protocol in ("UDP", "TCP"):
        if not allowed(None, 53, protocol):
            problems.append(f"DNS (53/{protocol}) is not allowed out")
    bootstrap = objects["Secret"]["stringData"]["GNPD_KAFKA__BOOTSTRAP_SERVERS"]
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        labels = host.split(".")
        namespace = labels[1] if len(labels) > 2 and labels[2] == "svc" else None
        if not allowed(namespace, int(port)):
            problems.append(f"Kafka {address} (namespace {namespace}) is not allowed out")
    return problems


def test_networkpolicy_lets_in_prometheus_and_ingress_and_out_only_kafka_and_dns(rendered):
    name, objects = rendered
    assert networkpolicy_problems(objects) == [], name
    policy = objects["NetworkPolicy"]["spec"]
    sources = {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
               for rule in policy["ingress"] for f in rule["from"]}
    assert sources == {"monitoring", "ingress-nginx"}, "the documented namespaces"


@pytest.mark.parametrize("breakage", ["kafka port", "open ingress", "no dns", "open egress"])
def test_networkpolicy_check_catches_a_broken_policy(breakage):
    objects = _by_kind(render(K8S / "base"))
    spec = objects["NetworkPolicy"]["spec"]
    if breakage == "kafka port":
        objects["Secret"]["stringData"]["GNPD_KAFKA__BOOTSTRAP_SERVERS"] = \
            "kafka-bootstrap.kafka.svc.cluster.local:9094"
    elif breakage == "open ingress":
        spec["ingress"].append({"ports": [{"port": "http"}]})
    elif breakage == "no dns":
        spec["egress"] = [r for r in spec["egress"] if all(p["port"] != 53 for p in r["ports"])]
    else:
        spec["egress"].append({"ports": [{"port": 443}]})
    assert networkpolicy_problems(objects)


def _secret_env(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_no_credentials_in_configmaps_or_committed_secrets(rendered):
    name, objects = rendered
    for kind in ("ConfigMap", "Secret"):
        data = {**objects[kind].get("data", {}), **objects[kind].get("stringData", {})}
        leaked = [k for k in data if any(word in k for word in SECRET_LIKE)]
        assert not leaked, f"{name}: {kind} commits {leaked}: reference a Secret made outside git"
    for env in _container(objects["StatefulSet"]).get("env", []):
        if any(word in env["name"] for word in SECRET_LIKE):
            assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} inline"


def test_secure_overlay_authenticates_to_kafka_and_clients(settings_from_env, settings_env_names,
                                                          tmp_path):
    missing = SECURITY_SETTINGS - settings_env_names
    if missing:
        pytest.skip(f"daemon.settings lacks {sorted(missing)} (issue 8 item 5, ingest side)")
    objects = _by_kind(render(K8S / "overlays/secure"))
    sts, cm = objects["StatefulSet"], objects["ConfigMap"]["data"]
    container = _container(sts)
    refs = _secret_env(container)
    assert set(refs) == {"GNPD_SERVE__API_TOKEN", "GNPD_KAFKA__SASL_USERNAME",
                         "GNPD_KAFKA__SASL_PASSWORD"}
    for env_name, ref in refs.items():
        assert ref == {"name": "gnpd-credentials", "key": env_name}, "documented key names"
        assert not ref.get("optional"), "a missing credential must keep the pod from starting"
    assert cm["GNPD_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    # The CA file is the one key of the gnpd-kafka-ca Secret volume, mounted read-only.
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    cafile = Path(cm["GNPD_KAFKA__SSL_CAFILE"])
    mount = next(m for m in container["volumeMounts"] if cafile.is_relative_to(m["mountPath"]))
    secret = volumes[mount["name"]]["secret"]
    assert mount.get("readOnly") and secret["secretName"] == "gnpd-kafka-ca"
    assert [i["path"] for i in secret["items"]] == [str(cafile.relative_to(mount["mountPath"]))]
    # The daemon accepts the result (the CA path replaced by a local file).
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {**cm, **objects["Secret"]["stringData"], "GNPD_KAFKA__SSL_CAFILE": str(ca),
           **{k: f"test-{k.lower()}" for k in refs}}
    settings = settings_from_env(env)
    assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.serve.api_token is not None
