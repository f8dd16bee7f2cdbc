"""pytest plugin shipped with vmkernel (entry point ``pytest11``).

Loads the hypothesis profile named by ``VMKERNEL_HYPOTHESIS_PROFILE`` and
provides fixtures:

* ``kernel``: a :class:`vmkernel.Kernel` with seed 0 and its data directory
  under ``tmp_path``; installed plugins autoload unless
  ``VMKERNEL_DISABLE_PLUGIN_AUTOLOAD`` is set.  Closed after the test.
* ``make_kernel``: a factory taking ``Kernel``'s keyword arguments, for tests
  that need several kernels or explicit plugins; all are closed after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkernel._kernel import Kernel
from vmkernel.testing.profiles import load_profile


def pytest_configure(config: pytest.Config) -> None:
    load_profile()


def pytest_report_header(config: pytest.Config) -> str:
    from vmkernel.testing.profiles import active_profile

    return f"vmkernel hypothesis profile: {active_profile()}"


@pytest.fixture
def make_kernel(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    made: list[Kernel] = []

    def factory(**kwargs: Any) -> Kernel:
        kwargs.setdefault("seed", 0)
        kwargs.setdefault("data_dir", tmp_path / f"kernel-{len(made)}")
        k = Kernel(**kwargs)
        made.append(k)
        return k

    yield factory
    for k in made:
        k.close()


@pytest.fixture
def kernel(make_kernel: Callable[..., Kernel]) -> Kernel:
    return make_kernel()
