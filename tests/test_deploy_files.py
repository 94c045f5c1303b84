"""The deployment files in docker/: structure, pinning, and agreement with the worker itself.

No docker engine or cluster is available to CI, so the files are checked as data: the compose
file's services, images, health checks and dependencies; the Dockerfile's stages, user and
entry point; the Kubernetes manifests against Kubernetes' own JSON schemas
(kubernetes-validate, strict) and against the worker's configuration (probe paths and port,
grace period against the drain time, secret keys, variable names).
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support import ROOT
from worker.config import Settings
from worker.observability import REGISTRY
from worker.tools.check_config import problems, reference_rows

DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
SETTING_VARIABLES = {env for _, env, _ in reference_rows()} | {"RC_WORKER_CONFIG"}
DEFAULTS = Settings()
# name:tag with a release number (PostgreSQL's are major.minor) or an @sha256 digest: never
# "latest", never a bare major.
PINNED = re.compile(r"^[\w./-]+(:v?\d+\.\d+(\.\d+)?[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


def pinned(image: str) -> bool:
    return bool(PINNED.match(image)) and (":" in image.split("/")[-1] or "@sha256:" in image)


# -- docker compose ----------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def seconds(duration: str) -> float:
    """A compose duration such as 45s or 1m30s, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


class TestCompose:
    def test_it_has_kafka_postgres_a_setup_job_the_workers_and_prometheus(self) -> None:
        """The five services the issue names, the bridge's two, and nothing unexplained."""
        assert set(compose()["services"]) == {"kafka", "postgres", "setup", "worker", "prometheus", "ingest", "apply"}

    def test_every_image_is_pinned_to_an_exact_release(self) -> None:
        """No floating tags: every image names an exact version (or digest)."""
        images = {name: spec["image"] for name, spec in compose()["services"].items()}
        assert all(pinned(image) for image in images.values()), images

    def test_kafka_is_the_official_image_in_kraft_mode(self) -> None:
        """apache/kafka as broker and controller, no ZooKeeper."""
        kafka = service("kafka")
        environment = kafka["environment"]
        assert kafka["image"].startswith("apache/kafka:")
        assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert not any("ZOOKEEPER" in key for key in environment)
        assert environment["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"

    def test_long_running_services_have_health_checks(self) -> None:
        """Kafka, PostgreSQL, the workers and Prometheus each say when they are healthy."""
        for name in ("kafka", "postgres", "worker", "prometheus"):
            assert service(name)["healthcheck"]["test"], name

    def test_the_setup_job_validates_migrates_and_creates_topics_once(self) -> None:
        """The one-shot job runs check-config, db upgrade and topics create, after Kafka and PostgreSQL are healthy."""
        setup = service("setup")
        command = " ".join(setup["command"])
        assert [step in command for step in ("rc-worker check-config", "rc-worker db upgrade", "rc-worker topics create")] == [True] * 3
        assert setup["restart"] == "no"
        assert {k: v["condition"] for k, v in setup["depends_on"].items()} == {"kafka": "service_healthy", "postgres": "service_healthy"}

    def test_workers_start_after_healthy_services_and_a_successful_setup(self) -> None:
        """depends_on with conditions: no worker starts against a broker or schema that is not there."""
        conditions = {k: v["condition"] for k, v in service("worker")["depends_on"].items()}
        assert conditions == {"kafka": "service_healthy", "postgres": "service_healthy", "setup": "service_completed_successfully"}

    def test_several_worker_replicas_each_given_longer_than_the_drain_to_stop(self) -> None:
        """Replicas form one group, and stop_grace_period exceeds processing.shutdown_timeout_s."""
        worker = service("worker")
        assert worker["deploy"]["replicas"] >= 2
        assert seconds(worker["stop_grace_period"]) > DEFAULTS.processing.shutdown_timeout_s
        assert worker["command"] == ["run"]

    def test_the_worker_health_check_probes_healthz_on_the_configured_port(self) -> None:
        """The compose health check asks /healthz on observability.port."""
        probe = " ".join(service("worker")["healthcheck"]["test"])
        assert f"127.0.0.1:{DEFAULTS.observability.port}/healthz" in probe

    def test_worker_variables_name_real_settings(self) -> None:
        """Every RC_WORKER_* variable given to the workers and the job is a key of Settings."""
        names = {k for name in ("setup", "worker") for k in service(name)["environment"] if k.startswith("RC_WORKER_")}
        assert names
        assert names <= SETTING_VARIABLES

    def test_workers_and_the_job_share_one_image_built_from_the_dockerfile(self) -> None:
        """Both use the image docker/Dockerfile builds from the repository root."""
        setup, worker = service("setup"), service("worker")
        assert setup["image"] == worker["image"]
        assert (DOCKER / setup["build"]["context"] / setup["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"

    def test_prometheus_mounts_files_that_exist(self) -> None:
        """The scrape config and alert rules mounted into Prometheus are in docker/."""
        sources = [volume.split(":")[0] for volume in service("prometheus")["volumes"]]
        assert sources == ["./prometheus.yml", "./alerts.yml"]
        assert all((DOCKER / source).is_file() for source in sources)


class TestComposeBridge:
    @pytest.mark.parametrize("name", ["ingest", "apply"])
    def test_the_bridge_runs_its_command_from_the_worker_image_only_with_its_profile(self, name: str) -> None:
        """ingest and apply use the workers' image, start after the setup job, and only with --profile rocketchat."""
        spec = service(name)
        assert spec["command"] == [name]
        assert spec["image"] == service("worker")["image"]
        assert spec["profiles"] == ["rocketchat"]
        assert spec["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert {k for k in spec["environment"] if k.startswith("RC_WORKER_")} <= SETTING_VARIABLES

    def test_ingest_listens_on_all_interfaces_in_the_container_and_on_loopback_on_the_host(self) -> None:
        """Inside the container 0.0.0.0 on ingest.port, published on 127.0.0.1, health checked on /healthz."""
        ingest = service("ingest")
        assert ingest["environment"]["RC_WORKER_INGEST__HOST"] == "0.0.0.0"  # noqa: S104 - inside the container
        assert ingest["ports"] == [f"127.0.0.1:{DEFAULTS.ingest.port}:{DEFAULTS.ingest.port}"]
        assert f"127.0.0.1:{DEFAULTS.ingest.port}/healthz" in " ".join(ingest["healthcheck"]["test"])
        assert seconds(ingest["stop_grace_period"]) > DEFAULTS.ingest.produce_timeout_s

    def test_the_workers_know_the_app_user_for_the_loop_guard(self) -> None:
        """The workers get rocketchat.app_user_id, so the app's own messages trigger nothing."""
        assert "RC_WORKER_ROCKETCHAT__APP_USER_ID" in service("worker")["environment"]


class TestPrometheus:
    def test_it_scrapes_every_worker_replica_on_the_metrics_port(self) -> None:
        """DNS discovery of the worker service finds one target per replica, on observability.port."""
        config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
        [job] = config["scrape_configs"]
        [discovery] = job["dns_sd_configs"]
        assert discovery["names"] == ["worker"]
        assert discovery["port"] == DEFAULTS.observability.port
        assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]

    def test_alert_rules_are_complete_and_use_metrics_the_worker_exports(self) -> None:
        """Each alert has an expression, a severity and a summary, and names only real rc_worker_* series."""
        exported = exported_series()
        rules = [rule for group in yaml.safe_load((DOCKER / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
        assert len(rules) >= 5
        for rule in rules:
            assert rule["alert"], rule
            assert rule["annotations"]["summary"], rule
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule
            used = set(re.findall(r"rc_worker_\w+", rule["expr"]))
            assert used, rule
            assert used <= exported, (rule["alert"], used - exported)


def exported_series() -> set[str]:
    """The series names the worker's registry exposes (counters as _total, histograms as _bucket/_count/_sum)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",), "gauge": ("",)}
    return {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ("",))}


# -- the Dockerfile ----------------------------------------------------------------------------


@cache
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def arguments(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


class TestDockerfile:
    def test_it_builds_in_two_stages_on_a_pinned_python_base(self) -> None:
        """A build stage and a runtime stage, both FROM an exact Python release; the runtime copies the build's virtualenv."""
        stages = arguments("FROM")
        assert [s.split()[-1] for s in stages] == ["build", "runtime"]
        base = next(rest.split("=", 1)[1] for rest in arguments("ARG") if rest.startswith("PYTHON_IMAGE="))
        assert pinned(base)
        assert re.match(r"python:3\.11\.\d+-slim", base)
        assert any(rest.startswith("--from=build ") for rest in arguments("COPY"))

    def test_it_runs_as_a_non_root_user(self) -> None:
        """The last USER is a numeric non-zero uid, so runAsNonRoot can verify it."""
        user = arguments("USER")[-1].split(":")[0]
        assert user.isdigit()
        assert int(user) != 0

    def test_the_health_check_probes_healthz(self) -> None:
        """HEALTHCHECK asks the worker's liveness endpoint."""
        [check] = arguments("HEALTHCHECK")
        assert "/healthz" in check
        assert "CMD" in check

    def test_the_entry_point_is_rc_worker_run(self) -> None:
        """ENTRYPOINT rc-worker with CMD run: `docker run IMAGE db upgrade` runs another command."""
        assert arguments("ENTRYPOINT") == ['["rc-worker"]']
        assert arguments("CMD") == ['["run"]']

    def test_what_it_copies_exists_and_is_in_the_build_context(self) -> None:
        """Every COPY source is in the repository and re-included by the Dockerfile's ignore file."""
        sources = [source for rest in arguments("COPY") if not rest.startswith("--from") for source in shlex.split(rest)[:-1]]
        included = {line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
        assert sources
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source in included, source

    def test_its_variables_name_real_settings(self) -> None:
        """Every RC_WORKER_* the image sets is a key of Settings."""
        names = set(re.findall(r"\b(RC_WORKER_\w+)=", " ".join(arguments("ENV"))))
        assert "RC_WORKER_OBSERVABILITY__HOST" in names
        assert names <= SETTING_VARIABLES


# -- Kubernetes ----------------------------------------------------------------------------------


@cache
def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest of docker/k8s by file name (one document each), the kustomization aside."""
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"}


def manifest(kind: str) -> dict[str, Any]:
    [found] = [doc for doc in manifests().values() if doc["kind"] == kind]
    return found


@cache
def cluster_settings() -> Settings:
    """The configuration the ConfigMap gives the workers."""
    return Settings(**yaml.safe_load(manifest("ConfigMap")["data"]["config.yaml"]))


def containers(kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = manifest(kind)["spec"]["template"]["spec"]["containers"]
    return found


WORKLOADS = ("Deployment", "StatefulSet")


class TestKubernetes:
    @pytest.mark.parametrize("name", [n for n, doc in manifests().items() if not doc["apiVersion"].startswith("keda.sh/")])
    def test_each_core_manifest_matches_the_kubernetes_schema(self, name: str) -> None:
        """Kubernetes' own schema, strict: a misspelt or misplaced field fails."""
        kubernetes_validate.validate(manifests()[name], kubernetes_validate.latest_version(), strict=True)

    def test_the_kustomization_lists_files_that_exist_and_one_workload(self) -> None:
        """kubectl apply -k applies the Deployment, not its StatefulSet alternative nor the KEDA example."""
        resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
        assert all((K8S / name).is_file() for name in resources)
        assert "deployment.yaml" in resources
        assert not {"statefulset.yaml", "keda-scaledobject.yaml"} & set(resources)

    def test_the_configmap_is_a_valid_configuration_without_problems(self) -> None:
        """The cluster's config.yaml loads, and check-config finds nothing wrong with it."""
        settings = cluster_settings()
        assert settings.observability.enabled
        assert settings.observability.host == "0.0.0.0"  # noqa: S104 - reachable by the kubelet and Prometheus
        assert problems(settings) == []

    @pytest.mark.parametrize("kind", WORKLOADS)
    def test_probes_ask_healthz_and_readyz_on_the_configured_port(self, kind: str) -> None:
        """Liveness on /healthz, readiness on /readyz, both on the port the ConfigMap configures."""
        [container] = containers(kind)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
        assert (live["path"], ready["path"]) == ("/healthz", "/readyz")
        assert ports[live["port"]] == ports[ready["port"]] == cluster_settings().observability.port

    @pytest.mark.parametrize("kind", WORKLOADS)
    def test_the_grace_period_exceeds_the_drain_time(self, kind: str) -> None:
        """terminationGracePeriodSeconds is longer than processing.shutdown_timeout_s."""
        grace = manifest(kind)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > cluster_settings().processing.shutdown_timeout_s

    @pytest.mark.parametrize("kind", [*WORKLOADS, "Job"])
    def test_secret_references_name_keys_the_secret_has(self, kind: str) -> None:
        """Every secretKeyRef points at the Secret of this directory and a key it defines."""
        secret = manifest("Secret")
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        refs = [e["valueFrom"]["secretKeyRef"] for c in containers(kind) for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert refs
        assert all(ref["name"] == secret["metadata"]["name"] and ref["key"] in keys for ref in refs)

    @pytest.mark.parametrize("kind", [*WORKLOADS, "Job"])
    def test_variables_name_real_settings_and_the_config_is_mounted_where_they_point(self, kind: str) -> None:
        """RC_WORKER_* names are Settings keys, and RC_WORKER_CONFIG is the mounted ConfigMap's config.yaml."""
        [container] = containers(kind)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert set(env) <= SETTING_VARIABLES
        volumes = {v["name"]: v for v in manifest(kind)["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        config = Path(env["RC_WORKER_CONFIG"])
        assert config.name == "config.yaml"
        assert mounts[str(config.parent)]["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]

    def test_static_membership_comes_from_the_stable_pod_name_in_the_statefulset_only(self) -> None:
        """The StatefulSet's members are static (pod name), with a session long enough to restart; the Deployment's are not."""
        [stateful] = containers("StatefulSet")
        [deployment] = containers("Deployment")
        env = {e["name"]: e for e in stateful["env"]}
        assert env["RC_WORKER_KAFKA__GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert int(env["RC_WORKER_KAFKA__SESSION_TIMEOUT_MS"]["value"]) > cluster_settings().kafka.session_timeout_ms
        assert "RC_WORKER_KAFKA__GROUP_INSTANCE_ID" not in {e["name"] for e in deployment["env"]}
        assert manifest("StatefulSet")["spec"]["serviceName"] == manifest("Service")["metadata"]["name"]

    def test_the_autoscaler_scales_the_deployment_on_the_groups_lag_up_to_the_partition_count(self) -> None:
        """KEDA's Kafka trigger watches the workers' group and topic, and never exceeds one replica per partition."""
        scaled = manifest("ScaledObject")
        kafka = cluster_settings().kafka
        [trigger] = scaled["spec"]["triggers"]
        target = scaled["spec"]["scaleTargetRef"]
        deployment = manifest("Deployment")
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert trigger["type"] == "kafka"
        metadata = trigger["metadata"]
        assert (metadata["bootstrapServers"], metadata["consumerGroup"], metadata["topic"]) == (
            kafka.bootstrap_servers,
            kafka.group_id,
            kafka.topic,
        )
        assert int(metadata["lagThreshold"]) > 0
        partitions = int(re.search(r"--partitions (\d+)", " ".join(containers("Job")[0]["args"])).group(1))  # type: ignore[union-attr]
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= partitions
        assert deployment["spec"]["replicas"] <= partitions


# -- Kubernetes: the bridge (docker/k8s/bridge/) -------------------------------------------------


@cache
def bridge_manifests() -> list[dict[str, Any]]:
    """Every document of docker/k8s/bridge."""
    return [doc for path in sorted((K8S / "bridge").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def bridge(kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in bridge_manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


BRIDGE = ("rc-worker-ingest", "rc-worker-apply")


class TestKubernetesBridge:
    @pytest.mark.parametrize("index", range(3))
    def test_each_manifest_matches_the_kubernetes_schema(self, index: int) -> None:
        """The ingest Deployment and Service and the apply Deployment, against Kubernetes' schema, strict."""
        assert len(bridge_manifests()) == 3
        kubernetes_validate.validate(bridge_manifests()[index], kubernetes_validate.latest_version(), strict=True)

    @pytest.mark.parametrize("name", BRIDGE)
    def test_secrets_variables_and_config_agree_with_the_worker_files(self, name: str) -> None:
        """Secret keys exist, RC_WORKER_* are Settings keys, and the ConfigMap is mounted where RC_WORKER_CONFIG points."""
        [container] = bridge("Deployment", name)["spec"]["template"]["spec"]["containers"]
        secret = manifest("Secret")
        keys = set(secret.get("stringData", {}))
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert refs
        assert all(ref["name"] == secret["metadata"]["name"] and ref["key"] in keys for ref in refs)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert set(env) <= SETTING_VARIABLES
        [volume] = bridge("Deployment", name)["spec"]["template"]["spec"]["volumes"]
        assert volume["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {str(Path(env["RC_WORKER_CONFIG"]).parent)}
        assert container["args"] == [name.removeprefix("rc-worker-")]

    def test_ingest_probes_healthz_on_the_configured_port_behind_its_service(self) -> None:
        """Both probes ask /healthz on ingest.port of the ConfigMap; the Service targets that port."""
        [container] = bridge("Deployment", "rc-worker-ingest")["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz"
            assert ports[container[probe]["httpGet"]["port"]] == cluster_settings().ingest.port
        [port] = bridge("Service", "rc-worker-ingest")["spec"]["ports"]
        assert port["targetPort"] in ports
        assert cluster_settings().ingest.host == "0.0.0.0"  # noqa: S104 - reached through the Service
        grace = bridge("Deployment", "rc-worker-ingest")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > cluster_settings().ingest.produce_timeout_s
