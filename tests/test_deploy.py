"""The deployment files under deploy/ stay valid and consistent with each other and with the code.

Kubernetes manifests are checked against the Kubernetes JSON schemas (kubernetes-validate),
docker-compose.yml and the two Dockerfiles (one image per role) structurally (no Docker engine is
needed), the systemd
units with `systemd-analyze verify` where it exists, and the compose init script is run for
real: the keys, certificates and TOML files it writes start a server and three nodes that
finish a round.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cipherhive.node.config import NodeConfig
from cipherhive.runtime import config
from cipherhive.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
INIT_SCRIPT = DEPLOY / "compose" / "init.sh"
BIN = Path(sys.executable).parent
CIPHERHIVE = shutil.which("cipherhive", path=str(BIN)) or shutil.which("cipherhive")
NODES = 3

HEALTH_COMMAND = ["cipherhive", "ctl", "--server", "127.0.0.1:7444", "--insecure", "health"]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}


def _load_config(cls: type[Any], path: Path) -> Any:
    """Load a TOML file the way the daemon does, ignoring this process's environment."""
    return config.load(cls, argparse.Namespace(config=path), environ={})


def _load_text(cls: type[Any], text: str) -> Any:
    """Load TOML text held in a manifest through the real loader (paths in it are absolute)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, encoding="utf-8")
        return _load_config(cls, path)


def _seconds(text: str) -> float:
    """A systemd or compose duration (45s, 1min, 1m30s, 90) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------- Kubernetes


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _k8s_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((path.name, doc))
    return docs


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs() if doc["kind"] == kind]


def _workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs() if doc["kind"] in ("StatefulSet", "Deployment")]


def _configmap_toml(name: str, key: str) -> tuple[str, dict[str, Any]]:
    (cm,) = [d for d in _of_kind("ConfigMap") if d["metadata"]["name"] == name]
    text = cm["data"][key]
    return text, tomllib.loads(text)


def _one(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["metadata"]["name"] == name]
    return doc


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert set(listed) == {p.name for p in _k8s_files()}
    assert kustomization["namespace"] == "cipherhive"


@pytest.mark.parametrize(
    ("filename", "doc"),
    _k8s_docs(),
    ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in _k8s_docs()],
)
def test_manifest_matches_the_kubernetes_schema(filename: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, desired_version=version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{filename}: {doc['kind']} {where}: {exc.message} (Kubernetes {version})")
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == "cipherhive", filename


def test_kubernetes_validate_rejects_a_broken_manifest() -> None:
    """The schema check above can fail: an unknown field and a wrong type are caught."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    server = _one(_workloads(), "cipherhive-server")
    container = server["spec"]["template"]["spec"]["containers"][0]
    for broken in ({**container, "livenessProbes": {}}, {**container, "ports": [{"containerPort": "x"}]}):
        doc = {
            **server,
            "spec": {
                **server["spec"],
                "template": {
                    **server["spec"]["template"],
                    "spec": {**server["spec"]["template"]["spec"], "containers": [broken]},
                },
            },
        }
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, desired_version=version, strict=True)


def test_workloads_run_unprivileged_with_limits() -> None:
    workloads = _workloads()
    assert {w["kind"] for w in workloads} == {"StatefulSet", "Deployment"}
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        containers = pod["containers"] + pod.get("initContainers", [])
        for c in containers:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"
            # One image per role: the server's has no PyTorch (deploy/server.Dockerfile).
            role = "server" if workload["kind"] == "StatefulSet" else "node"
            assert c["image"].split(":")[0] == f"cipherhive-{role}", where


def test_server_statefulset_matches_its_config() -> None:
    sts = _one(_of_kind("StatefulSet"), "cipherhive-server")
    text, _ = _configmap_toml("cipherhive-server-config", "server.toml")
    assert sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"] == ["server", "--config", f"{config_mount['mountPath']}/server.toml"]

    cfg = _load_text(ServerConfig, text)  # the ConfigMap's server.toml is a valid configuration

    # Probes: native gRPC against the plaintext health-only port, which the server opens.
    health_port = int(cfg.health_listen.rsplit(":", 1)[1])
    assert health_port == 7444
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(cfg.listen.rsplit(":", 1)[1]), "health": health_port}

    # Graceful shutdown fits in the termination grace period.
    assert pod["terminationGracePeriodSeconds"] > cfg.grace_seconds

    # Every file the config names is in a mounted volume; state is on the claim template.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts[str(cfg.state_dir)] in claims
    for field in ("public_context", "tls_crl"):
        path = getattr(cfg, field)
        assert path is not None, field
        volume = volumes[mounts[str(path.parent)]]
        assert "secret" in volume, f"{field} must come from a Secret"
    # The TLS files are copies the init container makes from the Secret (the server refuses
    # a key that group or others can read; kubelet adds group read with fsGroup).
    (init,) = pod["initContainers"]
    assert cfg.tls_key is not None and cfg.tls_cert is not None and cfg.tls_ca is not None
    private = volumes[mounts[str(cfg.tls_key.parent)]]
    assert private["emptyDir"]["medium"] == "Memory"
    script = "\n".join(init["command"] + init["args"])
    installed = {path: mode for mode, path in re.findall(r"install -m (0[0-7]{3}) \S+ (\S+)", script)}
    assert installed[str(cfg.tls_key)] == "0600"
    for path in (cfg.tls_cert, cfg.tls_ca):
        assert str(path) in installed
    tls_secret = next(
        v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "cipherhive-server-tls"
    )
    assert tls_secret["secret"]["defaultMode"] == 0o400
    assert tls_secret["name"] not in {m["name"] for m in container["volumeMounts"]}
    assert cfg.min_participants >= 2


def test_node_deployment_keeps_the_secret_context_private() -> None:
    deployment = _one(_of_kind("Deployment"), "cipherhive-node-1")
    text, _ = _configmap_toml("cipherhive-node-1-config", "node.toml")
    cfg = _load_text(NodeConfig, text)
    assert cfg.plugin == "cipherhive.demo.digits:DigitsTrainer"
    assert cfg.options["shard"] == 0 and cfg.options["shards"] == NODES
    assert cfg.workers > 0, "workers = 0 counts the host's cores, not the container's CPU limit"

    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    (init,) = pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"] == ["node", "--config", f"{config_mount['mountPath']}/node.toml"]

    # Secrets are mounted only into the init container, read-only, owner-only mode.
    secret_volumes = {name for name, v in volumes.items() if "secret" in v}
    assert secret_volumes
    for name in secret_volumes:
        assert volumes[name]["secret"]["defaultMode"] == 0o400, name
    assert not secret_volumes & {m["name"] for m in container["volumeMounts"]}
    assert all(m.get("readOnly") for m in init["volumeMounts"] if m["name"] in secret_volumes)

    # The init container copies each file the node reads into the tmpfs with mode 0600 or 0644.
    private = next(m for m in container["volumeMounts"] if m["mountPath"] == str(cfg.secret_context.parent))
    assert volumes[private["name"]]["emptyDir"]["medium"] == "Memory"
    assert private.get("readOnly") is True
    script = "\n".join(init["command"] + init["args"])
    installed = {path: mode for mode, path in re.findall(r"install -m (0[0-7]{3}) \S+ (\S+)", script)}
    assert installed[str(cfg.secret_context)] == "0600"
    assert installed[str(cfg.tls_key)] == "0600"
    for path in (cfg.tls_cert, cfg.tls_ca):
        assert str(path) in installed

    # State on the member's own claim.
    state = next(m for m in container["volumeMounts"] if m["mountPath"] == str(cfg.state_dir))
    claim = volumes[state["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in {p["metadata"]["name"] for p in _of_kind("PersistentVolumeClaim")}
    assert "livenessProbe" not in container  # the node serves no port to probe


def test_services_and_network_policy() -> None:
    services = _of_kind("Service")
    sts = _one(_of_kind("StatefulSet"), "cipherhive-server")
    selector = sts["spec"]["selector"]["matchLabels"]
    public = _one(services, "cipherhive-server")
    headless = _one(services, sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for service in (public, headless):
        assert service["spec"]["selector"] == selector
    assert [(p["port"], p["targetPort"]) for p in public["spec"]["ports"]] == [(7443, "grpc")]

    policies = _of_kind("NetworkPolicy")
    server_policy = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"] == selector)
    assert server_policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["port"] for rule in server_policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {7443, 7444}
    node_labels = _one(_of_kind("Deployment"), "cipherhive-node-1")["spec"]["selector"]["matchLabels"]
    node_policy = next(
        p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= node_labels.items()
    )
    assert node_policy["spec"]["policyTypes"] == ["Ingress"] and not node_policy["spec"].get("ingress")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(_k8s_docs())


# --------------------------------------------------------------------------- Dockerfile


ROLES = ("server", "node")


def _dockerfile_path(role: str) -> Path:
    return DEPLOY / f"{role}.Dockerfile"


def _dockerfile(role: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of ``role``'s Dockerfile, continuation lines joined, comments
    dropped."""
    lines: list[str] = []
    pending = ""
    for raw in _dockerfile_path(role).read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    instructions = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return value


def _final_stage(role: str) -> list[tuple[str, str]]:
    instructions = _dockerfile(role)
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _installs(role: str) -> list[str]:
    """Every pip install command in the RUN instructions of ``role``'s Dockerfile."""
    runs = [rest for kw, rest in _dockerfile(role) if kw == "RUN"]
    return [cmd for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)]


def _names(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirement strings."""
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_one_dockerfile_per_role() -> None:
    """The one shared deploy/Dockerfile made way for one image per role."""
    assert sorted(p.name for p in DEPLOY.glob("*Dockerfile*")) == sorted(
        f"{role}.Dockerfile{suffix}" for role in ROLES for suffix in ("", ".dockerignore")
    )


@pytest.mark.parametrize("role", ROLES)
def test_dockerfile_base_user_and_entrypoint(role: str) -> None:
    instructions = _dockerfile(role)
    args = {k: v for k, v in (rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)}
    bases = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert resolved == "python:3.11-slim", base
    final = _final_stage(role)
    users = [rest for kw, rest in final if kw == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    by_keyword = {kw: rest for kw, rest in final}  # last one wins, as in Docker
    assert _exec_form(by_keyword["ENTRYPOINT"]) == ["cipherhive"]
    assert _exec_form(by_keyword["CMD"]) == [role, "--config", f"/etc/cipherhive/{role}.toml"]
    assert _exec_form(by_keyword["VOLUME"]) == ["/var/lib/cipherhive"]
    healthcheck = by_keyword["HEALTHCHECK"]
    if role == "server":
        assert set(by_keyword["EXPOSE"].split()) == {"7443", "7444"}
        assert healthcheck.split()[0].startswith("--")
        assert _exec_form(healthcheck[healthcheck.index("CMD") + 3 :]) == HEALTH_COMMAND
    else:  # a node listens on nothing: no port, nothing for a health check to ask
        assert "EXPOSE" not in by_keyword
        assert healthcheck == "NONE"


@pytest.mark.parametrize("role", ROLES)
def test_dockerfile_installs_through_the_constraints(role: str) -> None:
    installs = _installs(role)
    assert installs
    for cmd in installs:
        assert "-c constraints.txt" in cmd, cmd
    package = re.compile(r"pip install (--no-compile )?-c constraints.txt (--no-deps )?\.\s*$")
    assert any(package.search(c.strip()) for c in installs)
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text(encoding="utf-8").split()


def test_server_image_installs_no_node_extra() -> None:
    """The server image installs the bare package's dependencies only: no `node` extra, no torch.

    Its requirements are pyproject's [project] dependencies, which must hold none of the node
    extra's packages; the node image adds the node extra's."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    node_extra = _names(pyproject["optional-dependencies"]["node"])
    assert {"torch", "scikit-learn", "opacus", "safetensors"} <= node_extra
    assert not _names(pyproject["dependencies"]) & node_extra, "the bare package depends on the node extra"

    for cmd in _installs("server"):
        assert not re.search(r"\[[^\]]*\]", cmd), f"the server image installs an extra: {cmd}"
        assert not any(re.search(rf"\b{re.escape(name)}\b", cmd) for name in node_extra), cmd
    server_runs = " ".join(rest for kw, rest in _dockerfile("server") if kw in ("RUN", "ARG"))
    assert "['project']['dependencies']" in server_runs
    assert "optional-dependencies" not in server_runs and "TORCH_INDEX_URL" not in server_runs
    node_runs = " ".join(rest for kw, rest in _dockerfile("node") if kw == "RUN")
    assert "['optional-dependencies']['node']" in node_runs


@pytest.mark.parametrize("role", ROLES)
def test_dockerfile_copies_every_package_folder(role: str) -> None:
    """COPY sources exist, and every folder pyproject builds a package from is in the image."""
    copied = set()
    for kw, rest in _dockerfile(role):
        if kw != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            copied.add(Path(source).parts[0])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = {Path(d).parts[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= copied, f"not copied into the image: {sorted(folders - copied)}"
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= copied


@pytest.mark.parametrize("role", ROLES)
def test_dockerignore_sends_what_the_dockerfile_copies(role: str) -> None:
    """deploy/<role>.Dockerfile.dockerignore excludes everything but the COPY sources (not .venv, .git)."""
    lines = (DEPLOY / f"{role}.Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:] for p in patterns if p.startswith("!")}
    for kw, rest in _dockerfile(role):
        if kw == "COPY" and "--from=" not in rest:
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert source in included or Path(source).parts[0] in included, source


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
@pytest.mark.parametrize("role", ROLES)
def test_hadolint(role: str) -> None:
    result = subprocess.run(
        ["hadolint", str(_dockerfile_path(role))], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_services_and_dependencies() -> None:
    services = _compose()["services"]
    nodes = [f"node-{i}" for i in range(1, NODES + 1)]
    assert set(services) == {"init", "server", *nodes}
    # The server runs the image without PyTorch; init (which runs `node layout`) and the nodes
    # the node image.
    for name, service in services.items():
        role = "server" if name == "server" else "node"
        assert service["image"].split(":")[0] == f"cipherhive-{role}", name
        assert service["build"]["dockerfile"] == f"deploy/{role}.Dockerfile", name
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name

    assert services["server"]["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
    for name in nodes:
        assert services[name]["depends_on"] == {
            "init": {"condition": "service_completed_successfully"},
            "server": {"condition": "service_healthy"},
        }, name
        assert services[name]["healthcheck"] == {"disable": True}, name
        assert services[name]["environment"]["OMP_NUM_THREADS"] == "1", name
    assert services["init"]["restart"] == "no"
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        if name != "init":  # init alone runs as root, to take ownership of fresh volumes
            assert "user" not in service, f"{name} must run as the image's user (10001)"
            assert "cap_add" not in service, name

    healthcheck = services["server"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", *HEALTH_COMMAND]
    assert _seconds(healthcheck["start_period"]) > 0


def test_compose_commands_match_what_init_writes() -> None:
    compose = _compose()
    services = compose["services"]
    init = services["init"]
    assert init["entrypoint"][0] == "bash"
    copy = next(rest for kw, rest in _dockerfile("node") if kw == "COPY" and "init.sh" in rest)
    assert shlex.split(copy) == ["deploy/compose/init.sh", init["entrypoint"][1]]
    out = Path(init["environment"]["CIPHERHIVE_INIT_OUT"])
    assert int(init["environment"]["CIPHERHIVE_INIT_NODES"]) == NODES
    init_volumes = dict(v.split(":", 1) for v in init["volumes"])

    def mounts(service: dict[str, Any]) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}

    for name, expected in [("server", "server.toml")] + [
        (f"node-{i}", f"node-{i}.toml") for i in range(1, NODES + 1)
    ]:
        service = services[name]
        command = service["command"]
        assert command[:2] == [name.split("-")[0], "--config"], name
        config_path = Path(command[2])
        assert config_path.name == expected, name
        volume = mounts(service)[str(config_path.parent)]
        # init writes that party's folder into exactly this volume
        assert init_volumes[volume] == str(out / name), name
        assert any(v.startswith(f"{volume}:") and v.endswith(":ro") for v in service["volumes"]), name
        assert mounts(service)["/var/lib/cipherhive"] == f"{name}-state", name
        assert set(compose["volumes"]) >= {volume, f"{name}-state"}

    # The server mounts no volume that holds secret.ctx (the authority or any node's).
    server_volumes = {v.split(":")[0] for v in services["server"]["volumes"]}
    assert server_volumes == {"server-config", "server-state"}


def test_compose_stop_grace_covers_the_server_grace(init_output: Path) -> None:
    cfg = _load_config(ServerConfig, init_output / "server" / "server.toml")
    for name, service in _compose()["services"].items():
        if name != "init":
            assert _seconds(service["stop_grace_period"]) > cfg.grace_seconds, name


# --------------------------------------------------------------------------- the compose init script


def test_init_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(INIT_SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert INIT_SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    assert os.access(INIT_SCRIPT, os.X_OK), "deploy/compose/init.sh is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_init_script_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", str(INIT_SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIPHERHIVE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run_init(out: Path) -> subprocess.CompletedProcess[str]:
    env = _clean_env(CIPHERHIVE_INIT_OUT=str(out), CIPHERHIVE_INIT_UID=str(os.getuid()))
    return subprocess.run(
        ["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def init_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert CIPHERHIVE, "the cipherhive command is not installed next to this Python"
    out = tmp_path_factory.mktemp("compose-init")
    result = _run_init(out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_init_writes_keys_certificates_and_configs(init_output: Path) -> None:
    out = init_output
    server = _load_config(ServerConfig, out / "server" / "server.toml")
    assert not server.insecure
    assert server.listen == "0.0.0.0:7443" and server.health_listen == "0.0.0.0:7444"
    assert server.state_dir == Path("/var/lib/cipherhive")
    assert server.min_participants == NODES
    for field in ("public_context", "tls_cert", "tls_key", "tls_ca", "tls_crl"):
        path = getattr(server, field)
        assert path.is_file() and path.parent == out / "server", field
    assert _mode(server.tls_key) == 0o600
    assert server.public_context.read_bytes() == (out / "authority" / "keys" / "public.ctx").read_bytes()
    # The server's folder holds no secret key of any kind.
    assert not list((out / "server").glob("secret*")) and not list((out / "server").glob("ca.key"))

    for i in range(1, NODES + 1):
        name = f"node-{i}"
        node = _load_config(NodeConfig, out / name / f"{name}.toml")
        assert node.server == "server:7443" and node.tls_server_name == "server"
        assert node.plugin == "cipherhive.demo.digits:DigitsTrainer"
        assert node.options["shard"] == i - 1 and node.options["shards"] == NODES
        assert node.secret_context.parent == out / name
        assert _mode(node.secret_context) == 0o600
        assert _mode(node.tls_key) == 0o600
        assert node.tls_cert.name == f"{name}.crt" and node.tls_ca.is_file()
        # The member's enrolment pair (signs round enrolments; cipherhive.pki.enrolment_certs).
        assert _mode(out / name / f"{name}.enrol.key") == 0o600
        assert (out / name / f"{name}.enrol.crt").is_file()
        assert _mode(out / name) == 0o700
        for path in (node.secret_context, node.tls_key, node.tls_cert):
            assert path.stat().st_uid == os.getuid()


def test_init_is_idempotent(init_output: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(init_output, out)
    kept = [
        "authority/keys/secret.ctx",
        "server/server.crt",
        "node-2/node-2.key",
        "node-2/node-2.enrol.key",
        "node-3/secret.ctx",
    ]
    before = {p: (out / p).read_bytes() for p in kept}
    # A node folder from before enrolment certificates existed gets both of its pairs reissued.
    (out / "node-1" / "node-1.enrol.crt").unlink()
    (out / "node-1" / "node-1.enrol.key").unlink()
    old_tls = (out / "node-1" / "node-1.crt").read_bytes()
    result = _run_init(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p: (out / p).read_bytes() for p in kept} == before
    assert "keeping the federation key" in result.stdout
    assert (out / "node-1" / "node-1.enrol.key").is_file()
    assert (out / "node-1" / "node-1.crt").read_bytes() != old_tls


def _health_status(port: int) -> int | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError:
            return None
    return int(reply.status)


def _ctl_health_available() -> bool:
    result = subprocess.run(
        [str(CIPHERHIVE), "ctl", "health", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode == 0


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_init_output_runs_a_federation_round(
    init_output: Path, tmp_path: Path, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    """The files init.sh writes, unchanged, run a server and three nodes through one round.

    Only what the containers get from their surroundings is overridden here, through the
    environment the daemons read: loopback ports instead of the compose network, and state
    directories in tmp_path instead of the image's volume.
    """
    from grpc_health.v1 import health_pb2

    from cipherhive.demo.federation import free_port

    out = tmp_path / "out"
    shutil.copytree(init_output, out)
    port, health_port = free_port(), free_port()
    state = tmp_path / "state"

    def spawn(name: str, args: list[str], env: dict[str, str]) -> None:
        with open(tmp_path / f"{name}.log", "wb") as log:
            processes[name] = subprocess.Popen(
                [str(CIPHERHIVE), *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in tmp_path.glob("*.log")
        )

    def wait(predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in processes.items():
                assert proc.poll() is None, (
                    f"{name} exited with {proc.returncode} while waiting for {what}\n{logs()}"
                )
            if predicate():
                return
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs()}")

    spawn(
        "server",
        ["server", "--config", str(out / "server" / "server.toml")],
        _clean_env(
            PYTHONUNBUFFERED="1",
            CIPHERHIVE_SERVER_LISTEN=f"127.0.0.1:{port}",
            CIPHERHIVE_SERVER_HEALTH_LISTEN=f"127.0.0.1:{health_port}",
            CIPHERHIVE_SERVER_STATE_DIR=str(state / "server"),
        ),
    )
    serving = health_pb2.HealthCheckResponse.SERVING
    wait(lambda: _health_status(health_port) == serving, 60, "the server's health port to report SERVING")
    if _ctl_health_available():  # the command the image's HEALTHCHECK runs
        check = subprocess.run(
            [str(CIPHERHIVE), "ctl", "--server", f"127.0.0.1:{health_port}", "--insecure", "health"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr

    for i in range(1, NODES + 1):
        name = f"node-{i}"
        spawn(
            name,
            ["node", "--config", str(out / name / f"{name}.toml")],
            _clean_env(
                PYTHONUNBUFFERED="1",
                CIPHERHIVE_NODE_SERVER=f"127.0.0.1:{port}",  # the certificate still says "server"
                CIPHERHIVE_NODE_STATE_DIR=str(state / name),
                OMP_NUM_THREADS="1",  # as in compose: three nodes share this machine's cores
            ),
        )
    # A published sum needs min_participants (3) distinct, authenticated nodes.
    wait(lambda: (state / "server" / "sums" / "round-1.sum").exists(), 90, "round 1's sum")

    # SIGTERM, as docker stop, systemd and kubelet send it: every daemon exits cleanly.
    nodes = [f"node-{i}" for i in range(1, NODES + 1)]
    for group in (nodes, ["server"]):
        for name in group:
            processes[name].send_signal(signal.SIGTERM)
        for name in group:
            try:
                code = processes[name].wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not stop within 30 s of SIGTERM\n{logs()}")
            assert code == 0, f"{name} exited with {code}\n{logs()}"


# --------------------------------------------------------------------------- systemd


def _shipped_grace_seconds() -> float:
    default = ServerConfig.__dataclass_fields__["grace_seconds"].default
    _, k8s = _configmap_toml("cipherhive-server-config", "server.toml")
    compose = re.search(r"^grace_seconds = ([\d.]+)$", INIT_SCRIPT.read_text(encoding="utf-8"), re.M)
    assert compose, "init.sh writes no grace_seconds"
    return max(float(default), float(k8s["server"]["grace_seconds"]), float(compose.group(1)))


def _units() -> list[Path]:
    return sorted(SYSTEMD.glob("*.service"))


def _unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


def test_systemd_units_exist() -> None:
    names = {p.name for p in _units()}
    assert {"cipherhive-server.service", "cipherhive-node.service"} <= names


@pytest.mark.parametrize("path", _units(), ids=lambda p: p.name)
def test_systemd_unit_is_hardened(path: Path) -> None:
    service = _unit(path)["Service"]
    role = "server" if "server" in path.name else "node"
    assert service["Type"] == "simple"
    exec_start = shlex.split(service["ExecStart"])
    assert len(exec_start) == 4 and exec_start[:3] == ["/usr/local/bin/cipherhive", role, "--config"]
    assert exec_start[3].startswith("/etc/cipherhive/") and exec_start[3].endswith(".toml")
    assert service["Restart"] == "on-failure"
    assert _seconds(service["RestartSec"]) > 0
    assert service["User"] and service["User"] != "root" and service["Group"]
    assert service["KillSignal"] == "SIGTERM"
    # Longer than the server's graceful shutdown, by default and in the shipped configs.
    assert _seconds(service["TimeoutStopSec"]) > _shipped_grace_seconds()
    assert int(service["LimitNOFILE"]) >= 4096
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}"
    assert "MemoryDenyWriteExecute" not in service, "PyTorch's JIT needs writable+executable memory"
    state = f"/var/lib/{service['StateDirectory']}".replace("%i", "<i>")
    assert service["ReadWritePaths"].replace("%i", "<i>") == state
    assert service["WorkingDirectory"].replace("%i", "<i>") == state
    assert service["StateDirectoryMode"] == "0700"
    if role == "node":
        assert service["User"] != _unit(SYSTEMD / "cipherhive-server.service")["Service"]["User"], (
            "the server's user must not be able to read the node's secret.ctx"
        )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert CIPHERHIVE
    targets = []
    for path in _units():
        text = path.read_text(encoding="utf-8")
        assert "/usr/local/bin/cipherhive " in text
        # verify checks that ExecStart's binary exists: point it at this environment's.
        (tmp_path / path.name).write_text(
            text.replace("/usr/local/bin/cipherhive", CIPHERHIVE), encoding="utf-8"
        )
        targets.append(path.name.replace("@.service", "@example.service"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *[f"./{t}" for t in targets]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "cipherhive" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


# --------------------------------------------------------------------------- Kubernetes: a standby

STANDBY = DEPLOY / "kubernetes-standby"


def _standby_rendered() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        ["kubectl", "kustomize", str(STANDBY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_standby_overlay_files_match_the_kubernetes_schema() -> None:
    """The overlay's own resource validates without kubectl; its patches, rendered, below."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    doc = yaml.safe_load((STANDBY / "server-state-pvc.yaml").read_text(encoding="utf-8"))
    kubernetes_validate.validate(doc, desired_version=version, strict=True)
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_standby_overlay_renders_two_replicas_over_postgresql_and_one_shared_volume() -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    docs = _standby_rendered()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, desired_version=version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} {where}: {exc.message}")
    assert len(docs) == len(_k8s_docs()) + 1  # the base's, and the shared claim
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 2 and "volumeClaimTemplates" not in sts["spec"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (cm,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cipherhive-server-config"
    ]
    cfg = _load_text(ServerConfig, cm["data"]["server.toml"])
    assert cfg.database.startswith("postgresql://") and cfg.password_file is not None

    # The state directory is the shared ReadWriteMany claim.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[str(cfg.state_dir)]]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # The password file is a 0600 copy in the memory-backed volume, made by the init container.
    assert volumes[mounts[str(cfg.password_file.parent)]]["emptyDir"]["medium"] == "Memory"
    (init,) = pod["initContainers"]
    script = "\n".join(init["command"] + init["args"])
    installed = {path: mode for mode, path in re.findall(r"install -m (0[0-7]{3}) \S+ (\S+)", script)}
    assert installed[str(cfg.password_file)] == "0600"
    assert installed[str(cfg.tls_key)] == "0600"

    # Readiness asks the default service (SERVING only while active): the Service sends the
    # standby nothing. Liveness and start-up ask one a standby reports SERVING too.
    from cipherhive.server.daemon import LIVE_HEALTH

    assert "service" not in container["readinessProbe"]["grpc"]
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": 7444, "service": LIVE_HEALTH}, probe
    (public,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "cipherhive-server"]
    assert public["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
