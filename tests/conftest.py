"""Shared fixtures: the tiny checkpoint (built once per run), its tokenizer, model and encoder,
and batched engines on it, closed after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from orca_space.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from orca_space.loading import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def encoder(tokenizer):
    from orca_space.chatml import ChatEncoder

    return ChatEncoder(tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from orca_space.loading import load_model

    return load_model(tiny_dir, "cpu")


@pytest.fixture()
def make_engine(request):
    """Builds `BatchedEngine`s (the tiny model unless `model` is given; no stop ids unless given),
    each warmed up, all closed after the test. Test modules wrap it with their own defaults."""
    from orca_space.engines.batched import BatchedEngine

    engines = []

    def build(model=None, **options) -> BatchedEngine:
        model = model if model is not None else request.getfixturevalue("tiny_model")
        engine = BatchedEngine(model, **{"stop_ids": (), **options})
        engines.append(engine)
        assert engine.wait_ready(30), "warm-up finishes"
        return engine

    yield build
    for engine in engines:
        engine.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not a keyword: a folder named gpu is one too
            item.add_marker(skip)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (each test makes its own contexts)."""
    from tests.browser_flow import chromium

    with chromium() as browser:
        yield browser


@pytest.fixture()
def anyio_backend():
    return "asyncio"
