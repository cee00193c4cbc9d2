"""How the test suite compiles: fast, and once. Its compile cache is shared across devices (a program
compiled for CPU devices 0-1 is loaded, not compiled again, for devices 2-3), and XLA's CPU backend skips
its costly code generation (``compile_fast``).

JAX keys its persistent cache on the program *and* the devices it was compiled for, except on GPU, where
it keys on the device count only and loads the executable onto the devices asked for. On CPU the second of
two identical decode replicas, or the same engine on other devices in a later test, compiles everything
again; in this suite that is a large part of its time. This module makes the CPU key leave the device
assignment out, as the GPU key does (the loaded executable still runs on the devices the caller asked for:
JAX hands them to the loader), and key CPU devices by their number rather than by the topology of the
process's client, so a worker process (one CPU device) and the pytest process (eight) share programs too.

tests/conftest.py applies it in the pytest process and puts this directory on ``PYTHONPATH``, so that
Python runs it at start-up (as ``sitecustomize``) in every subprocess the suite starts: ``jdisagg launch``
and its worker processes share the same cache directory. It patches a private function of JAX, so it only
touches JAX when a program looks up the cache and changes nothing when that function is not there;
``jax`` itself is not imported by it (the CLI must start without JAX).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_MODULE = "jax._src.cache_key"


def _strip_device_assignment(cache_key_module) -> None:
    hash_options = getattr(cache_key_module, "_hash_serialized_compile_options", None)
    if hash_options is None or getattr(hash_options, "strips_devices", False):
        return

    def without_devices(hash_obj, compile_options, strip_device_assignment=False):
        return hash_options(hash_obj, compile_options, strip_device_assignment=True)

    without_devices.strips_devices = True
    cache_key_module._hash_serialized_compile_options = without_devices

    hash_accelerators = getattr(cache_key_module, "_hash_accelerator_config", None)
    if hash_accelerators is not None:
        def cpu_by_count(hash_obj, accelerators):
            """CPU: the number of devices, not the topology of the process's client (a worker process has
            one CPU device, the pytest process eight: the same program would otherwise be keyed apart)."""
            devices = list(accelerators.flat)
            if devices and all(d.platform == "cpu" for d in devices):
                hash_obj.update(f"cpu x{len(devices)}".encode())
            else:
                hash_accelerators(hash_obj, accelerators)

        cache_key_module._hash_accelerator_config = cpu_by_count


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds JAX's cache-key module through the other finders, and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            _strip_device_assignment(module)

        spec.loader.exec_module = exec_module
        return spec


def share_across_devices() -> None:
    if _MODULE in sys.modules:
        _strip_device_assignment(sys.modules[_MODULE])
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def compile_fast() -> None:
    """Compile the suite's programs with LLVM at -O0 and XLA's classic CPU fusion emitter.

    The suite compiles hundreds of programs for a model that runs in milliseconds, so its time is code
    generation. Both flags act after XLA's HLO passes, which (fusion decisions included) are unchanged, so
    the tests run the same programs, only less optimised machine code: an engine's ~40 programs compile in
    7-8.5 s instead of 20-27 s. The benchmarks in tools/ do not come here and keep XLA's defaults. Flags
    already in ``XLA_FLAGS`` are kept.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in TEST_XLA_FLAGS if f not in flags])


share_across_devices()
compile_fast()
