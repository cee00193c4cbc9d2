"""``tools/host_profile.py``: the stack sampler that tells where the engine's stage threads spend a step."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "host_profile.py"
spec = importlib.util.spec_from_file_location("host_profile", TOOL)
host_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_profile)


def spin_in_a_named_function(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def test_sampler_attributes_a_threads_time_to_the_function_it_runs():
    sampler = host_profile.ThreadSampler(interval=0.001)
    stop = threading.Event()
    worker = threading.Thread(target=spin_in_a_named_function, args=(stop,), name="decode-test")
    sampler.start()
    worker.start()
    deadline = time.monotonic() + 30  # a bound against a hang, not a timing check
    while sampler.samples["decode-test"] < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    stop.set()
    worker.join()

    total = sampler.samples["decode-test"]
    assert total >= 50
    # The caller's thread is sampled too (in the engine bench it waits in generate()); the sampler's own
    # thread is not.
    assert sampler.samples["MainThread"] > 0 and "host-profile" not in sampler.samples
    spinning = sampler.inclusive["decode-test", "test_host_profile.py:spin_in_a_named_function"]
    assert spinning >= 0.9 * total  # a sample can land before the target starts or after it returns
    assert not any(where.endswith(":_bootstrap") for _, where in sampler.inclusive)
    report = sampler.report(["decode-test"])
    assert report.splitlines()[0] == f"thread decode-test ({total} samples)"
    assert "test_host_profile.py:spin_in_a_named_function" in report
