"""Test-wide set-up. Triton's interpreter must be chosen before `triton` is first imported, so that
Triton kernels run on CPU tensors in the suite (DESIGN §4)."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's on-disk graph cache does not key on our ops' schemas: a cache left by an older checkout can
# replay calls with stale signatures. Each test session compiles into its own directory.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mcl_kernels_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_isolate(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("MCL_KERNELS_BACKEND", raising=False)
    yield
