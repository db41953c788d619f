"""The shared engine servers, one per configuration (tests/server_process.py: SHARED)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llmgrpc_server import models

from tests.server_process import (
    EARLY,
    LAST_USE,
    LAUNCHED,
    SHARED,
    ServerProcess,
    engine_fixture,
    launch,
    running,
)
from tests.smollm_reference import MODEL, Greedy, greedy_answers

# A shared server -> the one launched with it, if this session uses that one.
# A start is mostly imports, one process at a time: two starts on this
# machine's two cores take little longer than one. The first waits for the
# second too, so that no test runs during a start; the second then sits idle
# (an idle engine sleeps) until its own tests.
STARTED_WITH = {"llama": "moe", "limited": "smollm"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """While the container image builds (minutes from a cold cache, mostly pip
    and layer commits), launch the shared servers the next engine test uses
    (and their STARTED_WITH partners): their start is done when the build is."""
    if not item.get_closest_marker("container"):
        return
    following = item.session.items[item.session.items.index(item) + 1 :]
    first = next((i for i in following
                  if i.get_closest_marker("engine") and not i.get_closest_marker("container")), None)  # fmt: skip
    name = next((n for n in first.fixturenames if n in SHARED), None) if first else None
    if name is not None:
        _launch_early(name)
        _launch_early(STARTED_WITH.get(name))


def _launch_early(name: str | None) -> None:
    """Launch shared server `name` ahead of its fixture, if this session uses
    it and has not started it (its fixture takes it from EARLY)."""
    if name is not None and name in LAST_USE and name not in LAUNCHED:
        EARLY[name] = launch(SHARED[name], name=name)


def _serve(name: str, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with running(SHARED[name], name, request) as server:
        partner = STARTED_WITH.get(name)
        _launch_early(partner)
        server.wait_serving()
        if partner in EARLY:
            EARLY[partner].wait_started()
        yield server


@engine_fixture()
def llama(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from _serve("llama", request)


@engine_fixture()
def moe(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from _serve("moe", request)


@engine_fixture()
def limited(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from _serve("limited", request)


@pytest.fixture(scope="session")
def smollm_reference() -> dict[str, Greedy]:
    """transformers' answers (the smollm fixture asks for them once its server
    is launched, so that they overlap its start where it is not up already)."""
    return greedy_answers(Path(models.resolve(MODEL, models.default_models_dir())))


@pytest.fixture(scope="session")
def lora_reference() -> dict[str, dict[str, Greedy]]:
    """transformers + peft's answers with each demo adapter (and without), by model name."""
    from llmgrpc_server.models import resolve_adapter

    from tests.integration.test_lora import LORA_PROMPTS, A, B
    from tests.lora_reference import greedy_with_adapter

    base = Path(models.resolve(MODEL, models.default_models_dir()))
    prompts = [(p, True) for p in LORA_PROMPTS]
    answers = {MODEL: greedy_with_adapter(base, None, prompts)}
    for name in (A, B):
        adapter = resolve_adapter(name, models.default_models_dir())
        answers[name] = greedy_with_adapter(base, adapter, prompts)
    return answers


@engine_fixture()
def smollm(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The real model's server (started with `limited`, STARTED_WITH), and
    transformers' reference answers (~45 s here), computed while it starts
    when it has not already."""
    with running(SHARED["smollm"], "smollm", request) as server:
        request.getfixturevalue("smollm_reference")
        request.getfixturevalue("lora_reference")
        server.wait_serving()
        yield server


@pytest.fixture(autouse=True)
def _shared_servers_alive(request: pytest.FixtureRequest) -> None:
    """A test on a shared server that an earlier test stopped fails, saying why."""
    for name in SHARED.keys() & set(request.fixturenames):
        server: ServerProcess = request.getfixturevalue(name)
        assert server.proc is not None
        if server.proc.poll() is not None:
            pytest.fail(f"the shared {name!r} server exited ({server.proc.returncode}) before "
                        f"this test: a test that stops it must be marked stops_server")  # fmt: skip
