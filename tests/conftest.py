"""Test set-up: 8 virtual CPU devices, float32 matmuls, and a page-leak check after every test.

The device count must be fixed before JAX initialises its backends, so it happens at import time here.

Most of the suite's time is XLA compiling: every ``Engine`` and every ``jdisagg launch`` compiles its
programs again. The whole session shares one fresh persistent compilation cache (a temporary directory,
removed at the end), so an identical program compiled by a later engine or subprocess is loaded from disk:
in this process through ``enable_compile_cache``, in subprocesses through ``XDG_CACHE_HOME``, where
``jdisagg launch`` and ``jdisagg worker`` keep theirs by default. A loaded program is not a compilation
(``jdisagg.compile_counter``); tests that need real compiles, or test the cache itself, pass their own
``--compile-cache``. The cache is keyed without the devices a program was compiled for
(tests/shared_compile_cache/sitecustomize.py, put on every subprocess's ``PYTHONPATH``): the second decode
replica, the same engine on other devices, or a worker process with one device, loads what the first
compiled. The same module sets test-only XLA flags that make CPU code generation cheap (``compile_fast``).

The page-leak check is the invariant docs/architecture.md promises: whenever an engine is idle, no KV page
is in use. Every ``Engine`` built in this process is recorded (module-scoped ones included), and so is every
server subprocess a test registers with ``kv_page_watch.watch_metrics``; after each test the check waits a
little for each of them to go idle, then fails the test if any page is still held.
"""

import atexit
import os
import runpy
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _xla_flags:  # an xdist worker inherits it
    os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()

import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# pytest-xdist's workers inherit the controller's environment: they all share the cache the controller made
# (and removes when the run ends), so a program one worker compiled is loaded by the other.
if "JDISAGG_TEST_CACHE_HOME" in os.environ:
    SESSION_CACHE_HOME = os.environ["JDISAGG_TEST_CACHE_HOME"]
else:
    SESSION_CACHE_HOME = tempfile.mkdtemp(prefix="jdisagg-test-cache-")
    os.environ["JDISAGG_TEST_CACHE_HOME"] = SESSION_CACHE_HOME
    atexit.register(shutil.rmtree, SESSION_CACHE_HOME, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = SESSION_CACHE_HOME  # read by every subprocess's default compile cache

SHARED_COMPILE_CACHE_HOOK = os.path.join(os.path.dirname(__file__), "shared_compile_cache")
_inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p and p != SHARED_COMPILE_CACHE_HOOK]
os.environ["PYTHONPATH"] = os.pathsep.join([SHARED_COMPILE_CACHE_HOOK, *_inherited])
runpy.run_path(os.path.join(SHARED_COMPILE_CACHE_HOOK, "sitecustomize.py"))  # this process too

from jdisagg.compile_cache import enable_compile_cache  # noqa: E402

enable_compile_cache()  # $XDG_CACHE_HOME/jdisagg/xla, the directory the subprocesses use too

IDLE_WAIT_S = 30.0  # a stream a test cancelled may still be on its way out of the decode loop


class KVPageWatch:
    """The engines and server metrics endpoints whose KV pages are checked after every test."""

    def __init__(self) -> None:
        self.engines: weakref.WeakSet = weakref.WeakSet()
        self.metrics_urls: set[str] = set()

    def watch_metrics(self, url: str) -> None:
        """Check a server subprocess too, through its ``/metrics`` endpoint (``jdisagg_kv_pages_used``)."""
        self.metrics_urls.add(url)

    def leaks(self) -> list[str]:
        """What still holds pages once everything had ``IDLE_WAIT_S`` to go idle (empty: no leak)."""
        deadline = time.monotonic() + IDLE_WAIT_S
        found = []
        for engine in list(self.engines):
            while (stats := engine.stats())["live"] or any(stats["pages_used"]):
                if time.monotonic() > deadline:
                    found.append(f"engine {id(engine):#x}: {stats}")
                    break
                time.sleep(0.05)
            if engine._stopping:  # shut down and clean: nothing can change any more
                self.engines.discard(engine)
        for url in sorted(self.metrics_urls):
            while (used := _pages_used(url)) and used > 0:
                if time.monotonic() > deadline:
                    found.append(f"{url}: jdisagg_kv_pages_used = {used}")
                    break
                time.sleep(0.05)
            if used is None:  # the server has stopped
                self.metrics_urls.discard(url)
        return found


def _pages_used(url: str) -> float | None:
    """Sum of ``jdisagg_kv_pages_used`` over replicas, or None when the endpoint no longer answers."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "jdisagg_kv_pages_used")


@pytest.fixture(scope="session")
def kv_page_watch() -> Iterator[KVPageWatch]:
    """Records every engine as it starts serving (``Engine._start`` is where in-process and worker-backed
    engines both begin), without touching the engine's code."""
    from jdisagg.engine import Engine

    watch = KVPageWatch()
    start = Engine._start

    def recording_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        watch.engines.add(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "_start", recording_start)
        yield watch


@pytest.fixture(autouse=True)
def no_leaked_kv_pages(kv_page_watch: KVPageWatch) -> Iterator[None]:
    yield
    leaks = kv_page_watch.leaks()
    if leaks:
        pytest.fail("KV pages still in use after the test:\n" + "\n".join(leaks), pytrace=False)


# The modules that take longest (minutes: worker clusters, launched servers, long prompts), slowest first.
# The README's command runs the suite on two pytest-xdist workers, one module at a time each, handed out in
# collection order; these start first so that none of them is left running alone at the end.
SLOWEST_MODULES = ("test_workers.py", "test_docs.py", "test_chunked_prefill.py", "test_server.py",
                   "test_demo_model.py", "test_cli.py", "test_engine.py", "test_http.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else len(SLOWEST_MODULES)

    items.sort(key=rank)  # stable: every module keeps its own order
