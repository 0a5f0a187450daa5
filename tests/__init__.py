"""The test suite.

Hypothesis is set up for a busy machine: no per-example deadline and no "too slow"
health check.  Both time the machine rather than the code under test, and would make
the default run fail when other work shares the cores (timing claims live behind the
``perf`` marker; see tests/waiting.py).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")
