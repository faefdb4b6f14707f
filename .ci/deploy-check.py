#!/usr/bin/env python3
"""Checks the deployment examples offline, against the binary they would run.

- The Kubernetes manifests validate against the API schema (kubernetes-validate, strict).
- Every environment a manifest gives nen-relay (compose service, init and main containers) is
  run through `nen-relay check-config` with dummy secret files: a misspelt or unknown variable,
  a bad value, or a missing production secret fails here, not at deploy time.
- Compose's stop grace period covers the shutdown budget (delay + drain), and so does
  Kubernetes' terminationGracePeriodSeconds.

Usage: python3 .ci/deploy-check.py target/release/nen-relay
"""

import os
import re
import subprocess
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
KUBERNETES = os.path.join(DEPLOY, "kubernetes")
# http.shutdown_delay (production) + http.shutdown_timeout, from config/*.toml.
SHUTDOWN_BUDGET_SECONDS = 5 + 20


def check_config(binary, env, where):
    """Runs `nen-relay check-config` with `env` alone; secret files get dummy contents."""
    with tempfile.TemporaryDirectory() as secrets:
        resolved = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for name, value in env.items():
            if name.endswith("_FILE"):
                path = os.path.join(secrets, name)
                with open(path, "w") as f:
                    f.write(dummy_secret(name))
                value = path
            resolved[name] = str(value)
        result = subprocess.run([binary, "check-config"], env=resolved, capture_output=True,
                                text=True, cwd=secrets, timeout=30)
    if result.returncode != 0:
        sys.exit(f"{where}: nen-relay check-config refused its environment: "
                 f"{result.stderr.strip() or result.stdout.strip()}")
    print(f"ok: {where}: {result.stdout.strip()}")


def dummy_secret(variable):
    if variable.startswith("DATABASE_URL"):
        return "postgres://nen_relay:x@127.0.0.1:1/nen_relay"
    return "a-dummy-secret-of-32-characters!"


def duration_seconds(text):
    match = re.fullmatch(r"(\d+)(s|m)", str(text))
    if not match:
        sys.exit(f"cannot read the duration {text!r}")
    return int(match[1]) * (60 if match[2] == "m" else 1)


def compose(binary):
    with open(os.path.join(DEPLOY, "compose.yaml")) as f:
        document = yaml.safe_load(f)
    service = document["services"]["nen-relay"]
    declared = set(document.get("secrets", {}))
    for secret in service.get("secrets", []):
        if secret not in declared:
            sys.exit(f"compose: the service uses the undeclared secret {secret!r}")
    for name, value in service["environment"].items():
        if name.endswith("_FILE") and not str(value).startswith("/run/secrets/"):
            sys.exit(f"compose: {name} should name a file under /run/secrets/")
    grace = duration_seconds(service["stop_grace_period"])
    if grace <= SHUTDOWN_BUDGET_SECONDS:
        sys.exit(f"compose: stop_grace_period {grace}s does not cover the {SHUTDOWN_BUDGET_SECONDS}s shutdown budget")
    if service.get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
        sys.exit("compose: nen-relay should wait for a healthy PostgreSQL")
    check_config(binary, service["environment"], "deploy/compose.yaml")


def kubernetes(binary):
    manifests = sorted(
        os.path.join(KUBERNETES, name) for name in os.listdir(KUBERNETES)
        if name.endswith(".yaml") and name != "kustomization.yaml"
    )
    subprocess.run(["kubernetes-validate", "--strict", "--quiet", *manifests], check=True)
    print(f"ok: {len(manifests)} manifests validate (kubernetes-validate --strict)")
    with open(os.path.join(KUBERNETES, "kustomization.yaml")) as f:
        listed = set(yaml.safe_load(f)["resources"])
    for path in manifests:
        name = os.path.basename(path)
        if name not in listed and not name.endswith(".example.yaml"):
            sys.exit(f"kubernetes: {name} is not listed in kustomization.yaml")
    with open(os.path.join(KUBERNETES, "deployment.yaml")) as f:
        pod = yaml.safe_load(f)["spec"]["template"]["spec"]
    if pod["terminationGracePeriodSeconds"] <= SHUTDOWN_BUDGET_SECONDS:
        sys.exit("kubernetes: terminationGracePeriodSeconds does not cover the shutdown budget")
    ports = {}
    for container in pod.get("initContainers", []) + pod["containers"]:
        env = {"NEN_RELAY_ENV": "production"}
        env.update({item["name"]: item["value"] for item in container.get("env", [])})
        if container["args"] == ["migrate"]:
            # The init container reads only what migrating needs; check-config wants the rest.
            env.setdefault("NEN_WEBHOOK_SECRETS_FILE", "/run/secrets/dummy")
            env.setdefault("NEN_RELAY_API_TOKENS_FILE", "/run/secrets/dummy")
        check_config(binary, env, f"deploy/kubernetes/deployment.yaml container {container['name']}")
        ports.update({port["name"]: port["containerPort"] for port in container.get("ports", [])})
    main = pod["containers"][0]
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        if main[probe]["httpGet"]["path"] != path:
            sys.exit(f"kubernetes: {probe} must probe {path}")
    ops_bind = next(item["value"] for item in main["env"] if item["name"] == "NEN_RELAY_OPS_BIND")
    if int(ops_bind.rsplit(":", 1)[1]) != ports["ops"]:
        sys.exit("kubernetes: the ops port does not match NEN_RELAY_OPS_BIND")


def main():
    binary = os.path.abspath(sys.argv[1])
    compose(binary)
    kubernetes(binary)
    print("deploy examples: ok")


if __name__ == "__main__":
    main()
