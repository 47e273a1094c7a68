"""The engine registry (voicepipe/engines.py) against what it describes: every engine package of
the project is registered and serves its registered role on its role's ports; every extra it
names is in pyproject.toml and every package in the project's distribution; the engines import
with their extras installed; and the Dockerfile and the Makefile take the engines from the
registry instead of naming them."""

from __future__ import annotations

import fnmatch
import importlib
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest

from tests.test_compose import PORTS as CONVENTIONS
from tests.test_compose import dockerfile, makefile
from voicepipe import engines as registry
from voicepipe.processes import PROJECT_ROOT
from voicepipe.stage.main import StageSpec

ENGINES = [pytest.param(engine, id=engine.module) for engine in registry.ENGINES]
PYPROJECT: dict[str, Any] = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def engine_packages_in_the_tree() -> set[str]:
    """Top-level packages named like an engine (`<role>_<name>`) that `python -m` can run."""
    return {
        path.parent.name for role in registry.ROLES for path in PROJECT_ROOT.glob(f"{role}_*/__main__.py")
    }


def test_every_engine_package_is_registered() -> None:
    assert engine_packages_in_the_tree() == {engine.module for engine in registry.ENGINES}


def test_each_role_has_a_stub_and_the_stack_runs_the_stubs_by_default() -> None:
    assert {role: "stub" for role in registry.ROLES} == registry.STUBS
    for role in registry.ROLES:
        assert registry.engine(role, registry.STUB).is_stub


def test_an_unknown_engine_is_refused_naming_the_ones_there_are() -> None:
    with pytest.raises(KeyError, match="no tts engine 'nope': one of stub, espeak, piper"):
        registry.engine("tts", "nope")


def test_the_ports_are_those_of_the_shared_conventions() -> None:
    for service, ports in CONVENTIONS.items():
        if service in registry.PORTS:
            assert (registry.PORTS[service].port, registry.PORTS[service].metrics_port) == (
                ports.port,
                ports.metrics_port,
            )


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_serves_its_role_on_the_roles_ports(engine: registry.Engine) -> None:
    main = importlib.import_module(f"{engine.module}.__main__")
    spec = main.SPEC
    assert isinstance(spec, StageSpec)
    assert (spec.role, spec.module) == (engine.role, engine.module)
    defaults = spec.parse_args([])
    assert (defaults.port, defaults.metrics_port) == (engine.ports.port, engine.ports.metrics_port)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_extras_are_in_pyproject_and_its_packages_in_the_distribution(engine: registry.Engine) -> None:
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert [extra for extra in engine.extras if extra not in optional] == []
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in engine.packages:
        assert (PROJECT_ROOT / package / "__init__.py").is_file(), package
        assert any(fnmatch.fnmatchcase(package, pattern) for pattern in include), package


def test_every_engine_imports_with_its_extras_as_the_real_images_build_checks() -> None:
    command = [sys.executable, "-m", "voicepipe.engines", "check", "real"]
    subprocess.run(command, cwd=PROJECT_ROOT, check=True, timeout=120)


def test_make_install_installs_every_engines_extra_through_the_registry() -> None:
    installs = [line for line in makefile() if re.search(r"pip install .*-e ", line)]
    assert installs and all("$(EXTRAS)" in line for line in installs), installs
    recipe = r"EXTRAS = .*\$\$\(\$\(PY\) -m voicepipe\.engines extras\)"
    assert any(re.fullmatch(recipe, line) for line in makefile())
    words = subprocess.run(
        [sys.executable, "-m", "voicepipe.engines", "extras"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert words.split(",") == registry.extras()


def test_the_dockerfile_names_no_engine_package_nor_extra() -> None:
    """Which engines an image installs, copies and imports comes from the registry alone (the
    Whisper stage's turn-model step, which prepares a model file, aside)."""
    names = {engine.module for engine in registry.ENGINES} | {
        extra for engine in registry.ENGINES for extra in engine.extras
    }
    for instruction in dockerfile():
        if instruction.keyword == "RUN" and ".turn_model " in instruction.arguments:
            continue
        words = set(re.findall(r"[\w-]+", instruction.arguments))
        assert not words & names, f"{instruction.keyword} {instruction.arguments} names {words & names}"
