"""The deployment files under infra/: they parse, the Kubernetes manifests match the API schema,
and the files agree with each other and with the code they deploy.

Cross-checks, each against the real source rather than a copy of it:

- Prometheus rules name only series that exist: the gateway's, read from the metric families that
  ``gateway.metrics.Metrics`` registers, and the engines', read from the ``/metrics`` of a running
  SGLang and vLLM simulator (which export the engines' own names);
- the ConfigMap's TOML loads with ``gateway.settings.load`` plus the Deployment's env overrides, and
  its ports, drain window and pools' SRV names match the Deployment, the probes and the StatefulSets'
  headless Services;
- the engines launch profiles that ``engine_nodes.profiles`` knows, with one GPU per TP rank;
- the DNS latency record is health-checked on /readyz.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine_nodes import drain, launch, profiles
from gateway import settings
from gateway.metrics import Metrics
from tests.conftest import http_get

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
# The oldest Kubernetes the manifests promise to work on (nodeTaintsPolicy, autoscaling/v2, policy/v1).
KUBERNETES_VERSION = "1.30.0"


class _TaggedLoader(yaml.SafeLoader):
    """Safe loading that keeps CloudFormation's short tags (``!Ref X`` -> ``{"Ref": "X"}``)."""


def _tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {tag_suffix: value}


_TaggedLoader.add_multi_constructor("!", _tagged)


def documents(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_TaggedLoader) if doc is not None]


def manifests() -> list[dict[str, Any]]:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in documents(K8S / name)]


def find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [m for m in manifests() if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    (found,) = find("Deployment", "edge-gateway")
    return found


@pytest.fixture(scope="module")
def container(deployment) -> dict[str, Any]:
    (found,) = deployment["spec"]["template"]["spec"]["containers"]
    return found


@pytest.fixture(scope="module")
def config(container) -> settings.Settings:
    """gateway.toml as the pod sees it: the ConfigMap's file plus the Deployment's env overrides."""
    (generator,) = documents(K8S / "kustomization.yaml")[0]["configMapGenerator"]
    (toml_file,) = generator["files"]
    env = {e["name"]: e["value"] for e in container.get("env", [])
           if e["name"].startswith(settings.ENV_PREFIX)}
    assert env, "the Deployment shows no EDGE_GATEWAY__ override"
    return settings.load(str(K8S / toml_file), environ=env)


def port_number(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


INFRA_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_and_json_file_under_infra_parses(path: Path):
    assert documents(path), f"{path} holds no document"


def test_kustomization_lists_every_manifest_in_the_directory():
    listed = set(documents(K8S / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_kubernetes_manifests_match_the_api_schema_strictly():
    import kubernetes_validate  # test extra; imported here so that its absence fails this test only

    errors = []
    for manifest in manifests():
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(part) for part in e.path)
            errors.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {e.message}")
    assert errors == []


# --- gateway Deployment and its config -------------------------------------------------------------


def test_configmap_toml_loads_and_the_env_override_sets_the_region(config, container):
    region = next(e["value"] for e in container["env"] if e["name"] == "EDGE_GATEWAY__REGION")
    assert config.region == region
    assert config.pools, "the regional config names no pool"


def test_deployment_mounts_the_generated_configmap_where_the_image_reads_its_config(deployment, container):
    spec = deployment["spec"]["template"]["spec"]
    (generator,) = documents(K8S / "kustomization.yaml")[0]["configMapGenerator"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if volumes[m["name"]].get("configMap")]
    assert volumes[mount["name"]]["configMap"]["name"] == generator["name"]
    assert container["args"] == ["--config", f"{mount['mountPath']}/{Path(generator['files'][0]).name}"]


def test_readiness_probes_readyz_on_the_public_listener(container, config):
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    assert port_number(container, probe["port"]) == config.listen.port


def test_liveness_probes_healthz_on_the_admin_listener_reachable_from_the_kubelet(container, config):
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert port_number(container, probe["port"]) == config.admin.port
    assert config.admin.host == "0.0.0.0"  # the kubelet probes the pod IP, not loopback


def test_termination_grace_period_exceeds_prestop_pause_plus_drain_window(deployment, container, config):
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert grace > float(command[1]) + config.timeouts.drain_s


def test_pods_run_as_the_images_non_root_user_on_a_read_only_root(deployment, container):
    dockerfile_users = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    uid, gid = (int(x) for x in dockerfile_users[-1])
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_at_least_two_gateway_pods_stay_up_through_voluntary_disruptions(deployment):
    (hpa,) = find("HorizontalPodAutoscaler", "edge-gateway")
    (pdb,) = find("PodDisruptionBudget", "edge-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 2
    # A replica count in the Deployment would reset the HPA's count on every apply.
    assert "replicas" not in deployment["spec"]


# --- engines ---------------------------------------------------------------------------------------


def engine_sets() -> dict[str, dict[str, Any]]:
    """StatefulSets by the pool they serve (their pod label edge-gateway/pool)."""
    return {s["spec"]["template"]["metadata"]["labels"]["edge-gateway/pool"]: s for s in find("StatefulSet")}


def test_pools_find_their_replicas_in_the_srv_records_of_their_statefulsets_headless_service(config):
    sets = engine_sets()
    assert set(sets) == {pool.name for pool in config.pools}
    for pool in config.pools:
        sts = sets[pool.name]
        (svc,) = find("Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None", "per-replica records need a headless Service"
        assert not svc["spec"].get("publishNotReadyAddresses"), "a replica should join once it is ready"
        (port,) = svc["spec"]["ports"]
        namespace = sts["metadata"]["namespace"]
        assert pool.srv == f"_{port['name']}._tcp.{svc['metadata']['name']}.{namespace}.svc.cluster.local"
        assert pool.endpoints == []


def test_gateway_pods_gossip_with_every_pod_of_their_deployment_on_a_port_only_they_may_reach(
        deployment, container, config):
    (peers,) = config.gossip.peers
    host, port = settings.peer_address(peers)
    name, namespace = host.split(".")[:2]
    (svc,) = find("Service", name)
    assert svc["metadata"]["namespace"] == namespace == deployment["metadata"]["namespace"]
    assert host == f"{name}.{namespace}.svc.cluster.local"
    assert svc["spec"]["clusterIP"] == "None", "one A record per pod needs a headless Service"
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["protocol"] == "UDP" and svc_port["port"] == port == config.gossip.port
    (container_port,) = [p for p in container["ports"] if p["name"] == svc_port["targetPort"]]
    assert container_port["containerPort"] == port and container_port["protocol"] == "UDP"
    assert config.workers == 1, "worker i would listen on port + i, which the Service does not name"
    env = {e["name"]: e for e in container["env"]}
    secret = env[config.gossip.secret_env]["valueFrom"]["secretKeyRef"]
    also = env[config.gossip.also_accepted_env]["valueFrom"]["secretKeyRef"]
    assert also["name"] == secret["name"], "both gossip secrets come from one Secret, rotated in one place"
    assert also["optional"] and not secret.get("optional"), "only the secret a rotation adds may be absent"
    (policy,) = find("NetworkPolicy", "edge-gateway")
    (rule,) = [r for r in policy["spec"]["ingress"] if {"port": port, "protocol": "UDP"} in r.get("ports", [])]
    assert rule["from"] == [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]


def test_new_work_is_placed_off_its_ring_owner_only_where_gateway_pods_gossip(config):
    # Off it, a cold prompt or new session is looked for in vain by pods that did not place it.
    routing = config.routing
    by_owner = routing.ring_choices == 1 and routing.ring_load_factor >= routing.load_factor
    assert by_owner or config.gossip.peers


def test_engines_launch_a_known_profile_of_their_pool_with_one_gpu_per_tp_rank(config):
    sets = engine_sets()
    for pool in config.pools:
        (engine,) = sets[pool.name]["spec"]["template"]["spec"]["containers"]
        assert engine["command"][:2] == ["engine-node", "launch"]
        args = launch.build_parser().parse_args(engine["command"][2:])
        profile = profiles.get(args.profile)
        assert (profile.engine, profile.role) == (pool.engine, pool.role)
        assert profile.model in pool.models
        assert (args.host, args.port) == ("0.0.0.0", port_number(engine, "http"))
        # The engines' scrape job needs /metrics, which SGLang serves only when asked to.
        if profile.engine == "sglang":
            assert "--enable-metrics" in launch.command(profile, args.host, args.port)
        gpus = engine["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == engine["resources"]["requests"]["nvidia.com/gpu"] == profile.tp


def test_engine_pods_keep_serving_until_the_gateways_stop_sending_and_their_requests_end(config):
    """The preStop hook (engine_nodes/drain.py) outlasts the gateways' view of DNS, and the grace
    period outlasts the hook, so SIGTERM never reaches an engine the gateways still use."""
    coredns_cache_s = 5.0  # CoreDNS's default cache TTL for cluster records
    for sts in engine_sets().values():
        pod = sts["spec"]["template"]["spec"]
        (engine,) = pod["containers"]
        command = engine["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["engine-node", "drain"]
        args = drain.build_parser().parse_args(command[2:])
        assert args.port == port_number(engine, "http")
        assert args.settle_s >= config.discovery.interval_s + coredns_cache_s
        assert pod["terminationGracePeriodSeconds"] > args.max_wait_s > args.settle_s


# --- engine autoscaling (infra/k8s-autoscaling) ------------------------------------------------------

AUTOSCALING = INFRA / "k8s-autoscaling"


def scaled_objects() -> list[dict[str, Any]]:
    return documents(AUTOSCALING / "engines-autoscaling.yaml")


def test_each_engine_pool_is_scaled_on_its_own_demand_record_below_its_profiles_capacity(config, rules):
    recorded = {rule["record"] for rule in rules if "record" in rule}
    sets = engine_sets()
    scaled = {}
    for obj in scaled_objects():
        assert (obj["apiVersion"], obj["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        target = obj["spec"]["scaleTargetRef"]
        (sts,) = find("StatefulSet", target["name"])
        assert target["kind"] == "StatefulSet" and obj["metadata"]["namespace"] == sts["metadata"]["namespace"]
        (trigger,) = obj["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert trigger["type"] == "prometheus" and promql_series_names(query) <= recorded
        (pool,) = re.findall(r'pool="([^"]+)"', query)
        assert sets[pool]["metadata"]["name"] == target["name"], f"{target['name']} reads the demand of pool {pool}"
        (engine,) = sts["spec"]["template"]["spec"]["containers"]
        profile = profiles.get(launch.build_parser().parse_args(engine["command"][2:]).profile)
        assert 0 < float(trigger["metadata"]["threshold"]) <= profile.max_running_requests
        assert 1 <= obj["spec"]["minReplicaCount"] <= sts["spec"]["replicas"] <= obj["spec"]["maxReplicaCount"]
        down = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300, "a GPU replica reloads its weights for minutes"
        scaled[pool] = obj
    assert set(scaled) == {p.name for p in config.pools}


def test_autoscaling_overlay_renders_the_region_with_its_scalers_and_no_fixed_engine_replica_counts():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(AUTOSCALING)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = [doc["kind"] for doc in rendered]
    assert kinds.count("ScaledObject") == len(scaled_objects())
    assert len(rendered) == len(manifests()) + 1 + len(scaled_objects())  # + the generated ConfigMap
    statefulsets = [doc for doc in rendered if doc["kind"] == "StatefulSet"]
    assert statefulsets and all("replicas" not in doc["spec"] for doc in statefulsets)


# --- Prometheus ------------------------------------------------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "bool", "offset", "inf", "nan"}


def promql_series_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left once strings, label matchers, ranges and
    label lists are removed, that are neither keywords nor called as functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1) not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def gateway_series() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix
            for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def exposed_series(text: str) -> set[str]:
    return {re.match(r"[A-Za-z_:][\w:]*", line).group(0)  # type: ignore[union-attr]
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    (doc,) = documents(INFRA / "prometheus" / "rules.yaml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promql_name_extraction_ignores_functions_labels_and_keywords():
    expr = ('sum by (reason) (rate(a_total{status=~"5..",x="y(z)"}[5m])) / ignoring (reason) group_left '
            'histogram_quantile(0.99, b:c_bucket) > 14.4 * 0.001 or vector(0)')
    assert promql_series_names(expr) == {"a_total", "b:c_bucket"}


def test_prometheus_rules_select_only_series_the_gateway_and_engines_export(rules, simulator):
    engine_names: set[str] = set()
    for flavor in ("sglang", "vllm"):
        status, body = http_get(f"{simulator(flavor).url(0)}/metrics")
        assert status == 200
        engine_names |= exposed_series(body.decode())
    recorded = {rule["record"] for rule in rules if "record" in rule}
    known = gateway_series() | engine_names | recorded
    used = {name for rule in rules for name in promql_series_names(rule["expr"])}
    assert used - known == set(), f"rules select series nobody exports: {sorted(used - known)}"
    # Both sides are really covered, so the check above is not vacuous.
    assert used & gateway_series() and used & {n for n in engine_names if n.startswith("sglang:")} \
        and used & {n for n in engine_names if n.startswith("vllm:")}


@pytest.mark.parametrize(("check", "target"), [("check", "rules.yaml"), ("test", "rules_test.yaml")])
def test_promtool_accepts_the_rules_and_their_unit_tests_pass(check, target):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run([promtool, check, "rules", target], cwd=INFRA / "prometheus",
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_summary_and_a_hold_time(rules):
    alerts = [rule for rule in rules if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {"GatewayErrorBudgetBurnFast", "GatewayPoolNoHealthyEndpoint",
                                            "GatewayTTFTSLOBreach", "GatewayEndpointUnhealthy",
                                            "GatewayStreamAborts"}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["for"], alert["alert"]


def test_scrape_config_keeps_the_ports_the_manifests_name(deployment, container, config):
    (doc,) = documents(INFRA / "prometheus" / "prometheus.yaml")
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    gateway_keep = next(r for r in jobs["edge-gateway"]["relabel_configs"] if r.get("action") == "keep")
    app, port_name = gateway_keep["regex"].split(";")
    assert app == deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert port_number(container, port_name) == config.admin.port
    assert config.listen.public_metrics is False  # metrics are scraped on admin, not public
    engine_keep = next(r for r in jobs["engines"]["relabel_configs"] if r.get("action") == "keep")
    engine_port = engine_keep["regex"].split(";")[1]
    for sts in engine_sets().values():
        (engine,) = sts["spec"]["template"]["spec"]["containers"]
        assert port_number(engine, engine_port)


# --- DNS -------------------------------------------------------------------------------------------


def test_latency_records_are_withdrawn_by_a_health_check_on_readyz():
    resources = documents(INFRA / "dns" / "route53-region.yaml")[0]["Resources"]
    latency = [r["Properties"] for r in resources.values()
               if r["Type"] == "AWS::Route53::RecordSet" and "Region" in r["Properties"]]
    assert latency
    for record in latency:
        check = resources[record["HealthCheckId"]["Ref"]]
        assert check["Type"] == "AWS::Route53::HealthCheck"
        assert check["Properties"]["HealthCheckConfig"]["ResourcePath"] == "/readyz"
        assert record["SetIdentifier"]
