"""Shared test set-up.

* Layout: tests/unit/ (no engine: kernels, config, CLEX ODE, vLLM internals, the
  reference), tests/engine/ (tests that start vLLM engines or servers, marked slow),
  tests/helpers/ (the harness and what tests share: engine runner and probes, server
  client, tiny checkpoints, the float64 reference, kernel test cases).
* Paths: tests/ (for the `helpers` package) and kernels/ (for `lminf_kernels`) go on
  sys.path, so tests/unit/ and tests/engine/ import both from this work tree.
* `seed`: every test that draws random inputs takes its seed from this fixture. The seed
  is LMINF_TEST_SEED (default DEFAULT_SEED); the fixture seeds `random`, torch and numpy,
  records the seed in the test's user_properties (junit XML) and a failing test's report
  shows it in a "seed" section, so the failure can be replayed:
      LMINF_TEST_SEED=<seed> pytest <test id>
  `module_seed` is the same number for module-scoped fixtures.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for _p in (TESTS.parent / "kernels", TESTS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DEFAULT_SEED = 1234
SEED_ENV = "LMINF_TEST_SEED"
_SEED_FIXTURES = ("seed", "module_seed")


def base_seed() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return DEFAULT_SEED
    try:
        return int(raw, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {raw!r}") from None


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def pytest_report_header(config):
    return f"{SEED_ENV}={base_seed()} (seed of the tests that draw random inputs)"


@pytest.fixture
def seed(request) -> int:
    """The seed of this test's random inputs; `random`, torch and numpy are seeded with it."""
    s = base_seed()
    seed_everything(s)
    request.node.user_properties.append(("seed", s))
    print(f"{SEED_ENV}={s}")
    return s


@pytest.fixture(scope="module")
def module_seed() -> int:
    """The same seed, for module-scoped fixtures (which cannot use `seed`)."""
    return base_seed()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    uses_seed = any(name in getattr(item, "fixturenames", ()) for name in _SEED_FIXTURES)
    if uses_seed and not any(k == "seed" for k, _ in item.user_properties):
        item.user_properties.append(("seed", base_seed()))
    outcome = yield
    report = outcome.get_result()
    if report.failed and uses_seed:
        report.sections.append(("seed", f"random inputs drawn with {SEED_ENV}={base_seed()}; "
                                         f"replay: {SEED_ENV}={base_seed()} pytest '{item.nodeid}'"))
