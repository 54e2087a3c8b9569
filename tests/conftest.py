import pytest


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and other test processes share the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
