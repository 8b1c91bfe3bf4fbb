#!/usr/bin/env python3
"""Offline checks of the deployment recipes in deploy/, run by tests/tests/deploy.rs.

- Every Kubernetes object in deploy/kubernetes (the kustomization's resources and the
  example Secret) against the Kubernetes API schemas of the oldest and newest version
  the manifests are meant for (kubernetes-validate, strict: an unknown field fails, as
  `kubectl apply --validate=strict` would).
- The KEDA ScaledObject against KEDA's own CRD schema, as cloudcoil-models-keda generates
  models from it, with unknown fields refused.
- What no schema says: the kustomization's files exist and nothing beside them is left
  out unnoticed, the ScaledObject targets the StatefulSet, and an unmasked /proc only
  comes with a user namespace (the API server refuses it otherwise).
- The Prometheus scrape job keeps the pods' label and port; the Containerfile passes
  hadolint.

Nothing here reaches the network. Exit status: 0 when everything passes; 1 with one line
per problem on stderr; 2 when a tool is missing, naming how to install it.

    python deploy/validate.py [--deploy-dir DIR]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INSTALL = (
    "python3 -m venv ~/.cache/buildpool/deploy-venv && "
    "~/.cache/buildpool/deploy-venv/bin/pip install -r deploy/requirements.txt "
    "(bash .ci/run does this)"
)

try:
    import jsonschema
    import kubernetes_validate
    import yaml
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
except ImportError as missing:
    print(f"validate.py: {missing.name} is not installed: {INSTALL}", file=sys.stderr)
    sys.exit(2)

# Pods need user namespaces (hostUsers: false) with an unmasked /proc: beta and on by
# default from 1.33. The newest version kubernetes-validate knows is checked too.
KUBERNETES_VERSIONS = ("1.33", "1.37")
# Files in deploy/kubernetes that are no resource of the kustomization, and why.
NOT_RESOURCES = {
    "kustomization.yaml": "the kustomization itself",
    "secret.example.yaml": "created by hand, so that applying never overwrites the token",
    "prometheus-scrape.yaml": "Prometheus configuration, not a Kubernetes object",
}


def strict(schema):
    """The schema with unknown properties refused wherever it names the properties: the
    API server drops (or, strict, refuses) fields a structural schema does not know,
    so a misspelt field would otherwise pass here and be lost there."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def at(path, root=""):
    """A field's place, as `kubectl explain` names it."""
    return ".".join([root] * bool(root) + [str(part) for part in path]) or "(top)"


def validate_scaled_object(document):
    """Problems of a ScaledObject against KEDA's schema: its spec (metadata is checked as
    every object's is, by the Kubernetes schema of ObjectMeta)."""
    schema = strict(ScaledObject.model_json_schema(by_alias=True))
    spec_schema = dict(schema["$defs"]["ScaledObjectSpec"], **{"$defs": schema["$defs"]})
    validator = jsonschema.Draft202012Validator(spec_schema)
    problems = [
        f"{at(error.absolute_path, 'spec')}: {error.message}"
        for error in validator.iter_errors(document.get("spec"))
    ]
    for key in document:
        if key not in ("apiVersion", "kind", "metadata", "spec"):
            problems.append(f"{key}: unknown field")
    return problems


def validate_kubernetes(document):
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"Kubernetes {version}: {at(error.absolute_path)}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(error.message)
    return problems


def validate_object(document):
    if not isinstance(document, dict) or "kind" not in document or "apiVersion" not in document:
        return ["not a Kubernetes object (kind and apiVersion)"]
    if document["apiVersion"].startswith("keda.sh/"):
        if document["kind"] != "ScaledObject":
            return [f"no schema here for KEDA's {document['kind']}"]
        # The object's metadata against Kubernetes' ObjectMeta, through a stand-in kind.
        metadata_only = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document.get("metadata")}
        return validate_scaled_object(document) + validate_kubernetes(metadata_only)
    return validate_kubernetes(document)


def pod_rules(document):
    """What the API server checks beyond the schema, for the fields these pods use."""
    pod = document
    for key in ("spec", "template", "spec"):
        pod = pod.get(key) if isinstance(pod, dict) else None
    if not isinstance(pod, dict):
        return []
    problems = []
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        proc_mount = container.get("securityContext", {}).get("procMount")
        if proc_mount == "Unmasked" and pod.get("hostUsers") is not False:
            problems.append(
                f"container {container.get('name')}: procMount Unmasked needs hostUsers: false"
            )
    return problems


def load_all(path):
    with path.open() as file:
        return [document for document in yaml.safe_load_all(file) if document is not None]


def check_kubernetes(directory):
    """Problems of deploy/kubernetes, as "file: problem" lines; what was checked, as
    lines; the objects, with their file names."""
    problems, checked = [], []
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources = kustomization.get("resources", [])
    for resource in resources:
        if not (directory / resource).is_file():
            problems.append(f"kustomization.yaml: resource {resource} does not exist")
    for path in sorted(directory.glob("*.y*ml")):
        if path.name not in resources and path.name not in NOT_RESOURCES:
            problems.append(f"{path.name}: neither a resource of kustomization.yaml nor known here")
    objects = []
    for name in [r for r in resources if (directory / r).is_file()] + ["secret.example.yaml"]:
        try:
            documents = load_all(directory / name)
        except (OSError, yaml.YAMLError) as error:
            problems.append(f"{name}: {error}")
            continue
        for document in documents:
            found = validate_object(document) + pod_rules(document)
            problems.extend(f"{name}: {problem}" for problem in found)
            objects.append((name, document))
            checked.append(f"{name}: {document.get('kind')} {document.get('metadata', {}).get('name')}")
    targets = {(d.get("kind"), d.get("metadata", {}).get("name")) for _, d in objects}
    for name, document in objects:
        if document.get("kind") != "ScaledObject":
            continue
        target = document.get("spec", {}).get("scaleTargetRef", {})
        wanted = (target.get("kind", "Deployment"), target.get("name"))
        if wanted not in targets:
            problems.append(f"{name}: scaleTargetRef {wanted[0]}/{wanted[1]} is not among the resources")
    return problems, checked, objects


def check_scrape_config(directory, objects):
    """The scrape job keeps what the StatefulSet's pods have: their name label and their
    port's name. (Debian's promtool has no Kubernetes discovery to check it with.)"""
    problems = []
    config = yaml.safe_load((directory / "prometheus-scrape.yaml").read_text())
    jobs = config.get("scrape_configs") or []
    pods = [d.get("spec", {}).get("template", {}) for _, d in objects if d.get("kind") == "StatefulSet"]
    if not jobs or not pods:
        return ["prometheus-scrape.yaml: needs a scrape job and a StatefulSet to scrape"]
    for job in jobs:
        name = job.get("job_name")
        if not name:
            problems.append("prometheus-scrape.yaml: a scrape job without job_name")
        roles = [sd.get("role") for sd in job.get("kubernetes_sd_configs") or []]
        if roles != ["pod"]:
            problems.append(f"prometheus-scrape.yaml: job {name}: discovers {roles}, not pods")
        keeps = {
            tuple(rule.get("source_labels") or []): rule.get("regex")
            for rule in job.get("relabel_configs") or []
            if rule.get("action") == "keep"
        }
        for template in pods:
            label = template.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")
            containers = template.get("spec", {}).get("containers", [])
            ports = [port.get("name") for c in containers for port in c.get("ports", [])]
            if keeps.get(("__meta_kubernetes_pod_label_app_kubernetes_io_name",)) != label:
                problems.append(f"prometheus-scrape.yaml: job {name} does not keep pods labelled {label}")
            if keeps.get(("__meta_kubernetes_pod_container_port_name",)) not in ports:
                problems.append(f"prometheus-scrape.yaml: job {name} keeps no port of {ports}")
    return problems


def check_containerfile(containerfile):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        print(f"validate.py: hadolint is not installed: {INSTALL}", file=sys.stderr)
        sys.exit(2)
    # No configuration file of the user's may change the verdict.
    with tempfile.TemporaryDirectory() as empty:
        ran = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "style", str(containerfile)],
            capture_output=True,
            text=True,
            check=False,
            cwd=empty,
            env={"PATH": "/usr/bin:/bin", "HOME": empty, "XDG_CONFIG_HOME": empty},
        )
    if ran.returncode != 0:
        return [f"Containerfile: {line}" for line in (ran.stdout + ran.stderr).splitlines() if line]
    return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy-dir", type=Path, default=Path(__file__).resolve().parent)
    deploy = parser.parse_args().deploy_dir
    problems, checked, objects = check_kubernetes(deploy / "kubernetes")
    problems += check_scrape_config(deploy / "kubernetes", objects)
    problems += check_containerfile(deploy / "container" / "Containerfile")
    for line in checked:
        print(f"checked {line}")
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        sys.exit(1)
    print(
        f"deploy/ is valid: {len(checked)} objects (Kubernetes {' and '.join(KUBERNETES_VERSIONS)}, "
        "KEDA's ScaledObject schema), the scrape job, the Containerfile"
    )


if __name__ == "__main__":
    main()
