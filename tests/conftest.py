"""Shared fixtures: the tiny checkpoint (built once per run), its tokenizer, model and encoder."""

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
