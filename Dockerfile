# One image for all four voicepipe services; the command chooses which one runs:
#   docker run voicepipe python -m orchestrator | stt_stub | llm_stub | tts_stub
# docker-compose.yml runs the whole pipeline from it.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: generated contract code and an installed virtualenv -------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# Versions are pinned in pyproject.toml only: the requirement lists are read from it, so the
# image gets exactly the pins (and the code generators) that `make install` gets.
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"]))' \
        > /tmp/runtime-requirements.txt \
    && python -c 'import tomllib; dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; tools = [r for r in dev if r.split("==")[0] in ("grpcio-tools", "mypy-protobuf")]; assert len(tools) == 2, tools; print("\n".join(tools))' \
        > /tmp/codegen-requirements.txt

# The code generators live in a virtualenv of their own that the runtime image never sees;
# constrained to the runtime pins so that they see the same protobuf as `make protos` does.
RUN python -m venv /opt/codegen \
    && /opt/codegen/bin/pip install -r /tmp/codegen-requirements.txt -c /tmp/runtime-requirements.txt
# Dependencies before the source, so that a code change does not reinstall them.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /tmp/runtime-requirements.txt

# The same protoc command as `make protos` (see Makefile), with the generators' virtualenv.
COPY protos/ protos/
RUN rm -rf voice && mkdir -p voice/v1 \
    && /opt/codegen/bin/python -m grpc_tools.protoc -Iprotos \
        --python_out=. --grpc_python_out=. \
        --plugin=protoc-gen-mypy=/opt/codegen/bin/protoc-gen-mypy --mypy_out=. \
        --plugin=protoc-gen-mypy_grpc=/opt/codegen/bin/protoc-gen-mypy_grpc --mypy_grpc_out=. \
        protos/voice/v1/*.proto \
    && touch voice/__init__.py voice/v1/__init__.py voice/py.typed

COPY voicepipe/ voicepipe/
COPY orchestrator/ orchestrator/
COPY voicepipe_client/ voicepipe_client/
COPY stt_stub/ stt_stub/
COPY llm_stub/ llm_stub/
COPY tts_stub/ tts_stub/
COPY stubs/ stubs/
# Not editable: the runtime stage copies /opt/venv alone, without /src.
RUN /opt/venv/bin/pip install .

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Inside a container the services listen on every interface; outside one they default to
# loopback. The ports stay at their defaults (see EXPOSE).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VOICEPIPE_ORCHESTRATOR_HOST=0.0.0.0 \
    VOICEPIPE_STT_HOST=0.0.0.0 \
    VOICEPIPE_LLM_HOST=0.0.0.0 \
    VOICEPIPE_TTS_HOST=0.0.0.0
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin voicepipe
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Numeric, so that a runtime enforcing non-root users can verify it without /etc/passwd.
USER 10001:10001
# Fails the build if the installed packages cannot load their generated code.
RUN python -c "import orchestrator.__main__, stt_stub.__main__, llm_stub.__main__, tts_stub.__main__, voicepipe.healthcheck, voicepipe_client.cli"

# gRPC: orchestrator, STT, LLM, TTS; then their Prometheus /metrics endpoints.
EXPOSE 50051 50052 50053 50054 9601 9602 9603 9604
# No service by default: which one runs is always explicit in the command.
CMD ["python", "-c", "raise SystemExit('give a command: python -m orchestrator | stt_stub | llm_stub | tts_stub')"]
