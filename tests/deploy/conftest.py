"""Fixtures for the deployment tests."""

from __future__ import annotations

import pytest

from tests.deploy.deploy_support import DOCKER_DIR, Dockerfile, parse_dockerfile


@pytest.fixture(scope="session")
def cpu_dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKER_DIR / "Dockerfile")


@pytest.fixture(scope="session")
def cuda_dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKER_DIR / "Dockerfile.cuda")
