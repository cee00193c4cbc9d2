"""Every example a reader would copy out of README.md and docs/*.md runs here, so breaking one fails CI.

Rules, so that sections added later are covered the same way:

- A fenced block tagged ``bash``/``sh``/``shell`` or ``python``/``py`` runs; untagged and ``text`` blocks are
  pictures and printed output. A block that must not run here (GPU-only, multi-host, hours of training, the
  test suite itself) has ``<!-- doc-test: skip (reason) -->`` on the line before its fence, and is reported
  as skipped with that reason.
- Shell blocks run line by line (``\\`` continues a line, ``&&`` and ``;`` chain, ``#`` starts a comment)
  with a scratch directory as the working directory that links to every top-level entry of the checkout,
  so ``python tools/...`` works and the files an example writes land in the scratch directory. Every
  command must exit 0.
- The servers' fixed ports (every non-zero port default of ``jdisagg launch``, read from its parser) are
  mapped to free ones: a port written after a colon is rewritten, and a ``jdisagg`` command that leaves
  out a flag whose default is such a port (``--port``, ``--server``, ...) gets the mapped value.
- ``jdisagg launch`` (foreground or with ``&``) starts a server and waits until it prints that it serves.
  Servers are shared by the blocks that launch the same options (compared parsed, ports left out, unset
  meshes as the 8-device defaults they resolve to), each server with its own port mapping, so the README's
  plain ``jdisagg launch`` and docs' ``jdisagg launch &`` compile once. A block that talks to a server
  (names a fixed port, or runs ``jdisagg generate``/``bench``) and starts none gets the plain launch's. At
  the end every server gets SIGTERM and must exit 0.
- ``pip install`` is checked, not run: the suite runs in the installed environment, so every requirement
  the command names (the project's own, with its extras) must already be installed in a satisfying
  version. Installing would need the network and change the environment under the other tests.
- ``jdisagg bench --num-requests N`` is capped at 8 requests: the example is tested for its flags and
  wiring, not for its throughput numbers.
- Python blocks run in a fresh interpreter without the suite's JAX settings (no ``XLA_FLAGS``, no
  ``JAX_PLATFORMS``), as a reader's would, and must print something. They do get the compile cache the
  launched servers share (JAX's own ``JAX_COMPILATION_CACHE_DIR``; ``Engine`` leaves it off by itself), so
  an example's programs that a server of the same model and meshes compiled are loaded, not compiled.

Cost: dominated by the compiles of one default ``jdisagg launch`` and the README's Python example, which
loads the launch's prefill-side programs and samplers from the shared compile cache and compiles the rest
(its decode programs have another context). On the shared 2-core machine under heavy load from other
work (load average 15-20), with README's ``--processes`` block still run here: 8m50s wall and 3.5
CPU-minutes with a warm cache, 16m20s and 6.8 CPU-minutes with a cold one (the default launch 465 s, the
``--processes`` launch 346 s); that block is now skipped (tests/test_workers.py runs that launch).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jdisagg.cli import _build_parser
from jdisagg.serving.devices import DEFAULT_DECODE_MESH, DEFAULT_PREFILL_MESH

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s*\((?P<reason>.+)\)\s*-->")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[\w+-]*)")
START_TIMEOUT_S = 900.0
COMMAND_TIMEOUT_S = 600.0
BENCH_REQUESTS_CAP = 8
SERVING = "jdisagg: serving on"
JAX_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    kind: str  # "shell" or "python"
    code: str
    skip: str | None  # the reason, when marked

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The runnable fenced blocks of a markdown file, with their skip marks."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening["fence"], i
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        kind = LANGUAGES.get(opening["info"].lower())
        if kind:
            before = next((line for line in reversed(lines[:start]) if line.strip()), "")
            mark = SKIP.search(before)
            code = "\n".join(lines[start + 1 : i]) + "\n"
            blocks.append(Block(path, start + 1, kind, code, mark["reason"] if mark else None))
        i += 1
    return blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_port_defaults() -> dict[str, int]:
    """Every port option of ``jdisagg launch`` with a fixed default: ``{"port": 50051, ...}``."""
    launch = _subparsers()["launch"]
    return {a.dest: a.default for a in launch._actions
            if a.dest.endswith("port") and isinstance(a.default, int) and a.default}


def _subparsers():
    parser = _build_parser()
    action = next(a for a in parser._actions if a.choices and "launch" in a.choices)
    return action.choices


PORT_DEFAULTS = _launch_port_defaults()
FIXED_PORTS = sorted(PORT_DEFAULTS.values())
_PORT_TEXT = re.compile(r"(?<=:)(" + "|".join(str(p) for p in FIXED_PORTS) + r")(?!\d)")


def fresh_ports() -> dict[int, int]:
    """A free port for every fixed one: one server's mapping."""
    return {port: _free_port() for port in FIXED_PORTS}


def map_ports(text: str, ports: dict[int, int]) -> str:
    """``127.0.0.1:50051`` -> ``127.0.0.1:<mapped>`` for every fixed port."""
    return _PORT_TEXT.sub(lambda m: str(ports[int(m[1])]), text)


def add_port_flags(argv: list[str], ports: dict[int, int]) -> list[str]:
    """A ``jdisagg SUB`` command with every left-out flag whose default is a fixed port set explicitly.

    Flags given with a fixed port as their value (``--port 50051``) are mapped too.
    """
    sub = _subparsers().get(argv[1]) if len(argv) > 1 else None
    if sub is None:
        return argv
    argv = [str(ports.get(int(a), a)) if a.isdigit() else a for a in argv]
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    extra = []
    for action in sub._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag in given:
            continue
        if type(action.default) is int and action.default in ports:
            extra += [flag, str(ports[action.default])]
        elif isinstance(action.default, str) and map_ports(action.default, ports) != action.default:
            extra += [flag, map_ports(action.default, ports)]
    return [*argv, *extra]


def cap_bench(argv: list[str]) -> list[str]:
    if argv[:2] != ["jdisagg", "bench"] or "--num-requests" not in argv:
        return argv
    i = argv.index("--num-requests") + 1
    return [*argv[:i], str(min(int(argv[i]), BENCH_REQUESTS_CAP)), *argv[i + 1 :]]


def shell_commands(code: str) -> list[tuple[str, bool]]:
    """(command, background) pairs: continuations joined, comments dropped, ``&&``/``;`` chains split."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            if part:
                background = part.endswith("&") and not part.endswith("&&")
                commands.append((part.rstrip("&").strip(), background))
    return commands


# ----------------------------------------------------------------------------- running


class Servers:
    """``jdisagg launch`` processes shared by the module: one per distinct set of options (compared parsed,
    ports and unset meshes resolved to what the launch resolves them to), each on its own free ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._running: dict[tuple, tuple[subprocess.Popen, dict[int, int], Path]] = {}

    def ensure(self, argv: list[str]) -> dict[int, int]:
        """Start the server ``argv`` (written with fixed ports) describes unless it runs; its port mapping."""
        options = vars(_build_parser().parse_args(argv[1:]))
        options["prefill_mesh"] = options["prefill_mesh"] or DEFAULT_PREFILL_MESH
        options["decode_mesh"] = options["decode_mesh"] or DEFAULT_DECODE_MESH
        key = tuple(sorted((k, str(v)) for k, v in options.items() if not k.endswith("port") and k != "run"))
        if key in self._running:
            return self._running[key][1]
        ports = fresh_ports()
        log = self.workdir / f"server-{len(self._running)}.log"
        command = [*add_port_flags(argv, ports), "--no-progress"]
        with open(log, "wb") as err:
            process = subprocess.Popen(command, cwd=self.workdir, env=_user_env(), stdout=subprocess.PIPE,
                                       stderr=err, text=True)
        self._running[key] = (process, ports, log)
        serving = threading.Event()

        def watch() -> None:  # reads stdout to its end, so the pipe never fills
            for line in process.stdout:
                if line.startswith(SERVING):
                    serving.set()

        threading.Thread(target=watch, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not serving.wait(1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{shlex.join(command)} did not serve:\n{log.read_text()[-3000:]}")
        return ports

    def stop_all(self) -> list[str]:
        """SIGTERM every server; a complaint for each that did not exit 0."""
        problems = []
        for process, _ports, _log in self._running.values():
            process.send_signal(signal.SIGTERM)
        for process, _ports, log in self._running.values():
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            if code != 0:
                problems.append(f"server exited {code}:\n{log.read_text()[-2000:]}")
        self._running.clear()
        return problems


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch directory that looks like the checkout: top-level entries are links into it."""
    path = tmp_path_factory.mktemp("docs")
    for entry in ROOT.iterdir():
        if entry.name != ".git":
            (path / entry.name).symlink_to(entry)
    return path


@pytest.fixture(scope="module")
def servers(workdir) -> Iterator[Servers]:
    pool = Servers(workdir)
    yield pool
    problems = pool.stop_all()
    assert not problems, "\n".join(problems)


def _user_env() -> dict[str, str]:
    """The environment a reader's shell would have: none of the suite's JAX settings."""
    return {k: v for k, v in os.environ.items() if k not in JAX_ENV}


def _cached_env() -> dict[str, str]:
    """``_user_env`` with JAX's persistent compile cache on in the directory ``jdisagg launch`` uses by
    default (``$XDG_CACHE_HOME/jdisagg/xla``, the suite's), every program cached as launch caches them."""
    from jdisagg.compile_cache import default_cache_dir

    return {**_user_env(), "JAX_COMPILATION_CACHE_DIR": str(default_cache_dir()),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(argv_or_command: list[str] | str, workdir: Path, what: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    shell = isinstance(argv_or_command, str)
    result = subprocess.run(argv_or_command, shell=shell, cwd=workdir, env=env or _user_env(),
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                            executable="/bin/bash" if shell else None)
    assert result.returncode == 0, (f"{what} exited {result.returncode}\nstdout:\n{result.stdout[-2000:]}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")
    return result


def _needs_server(code: str) -> bool:
    return bool(_PORT_TEXT.search(code)) or bool(re.search(r"\bjdisagg\s+(generate|bench)\b", code))


def _server_for(block: Block, servers: Servers) -> dict[int, int]:
    """The port mapping of the server the block launches or talks to (a plain launch when it names none)."""
    commands = shell_commands(block.code) if block.kind == "shell" else []
    launches = {c for c, _ in commands if shlex.split(c)[:2] == ["jdisagg", "launch"]}
    assert len(launches) <= 1, f"{block.name}: one jdisagg launch per block, please"
    if launches:
        return servers.ensure(shlex.split(launches.pop()))
    if _needs_server(block.code):
        return servers.ensure(["jdisagg", "launch"])
    return fresh_ports()


def run_shell_block(block: Block, workdir: Path, servers: Servers) -> None:
    ports = _server_for(block, servers)
    for command, _background in shell_commands(map_ports(block.code, ports)):
        argv = shlex.split(command)
        if argv[:2] == ["pip", "install"]:
            check_pip_install(argv)
        elif argv[:2] == ["jdisagg", "launch"]:
            pass  # started by _server_for
        elif argv[:1] == ["jdisagg"]:
            _run(cap_bench(add_port_flags(argv, ports)), workdir, f"{block.name}: {command}")
        else:
            _run(command, workdir, f"{block.name}: {command}")


def run_python_block(block: Block, workdir: Path, servers: Servers) -> str:
    ports = _server_for(block, servers)
    script = workdir / f"block_{block.path.stem}_{block.line}.py"
    script.write_text(map_ports(block.code, ports))
    result = _run([sys.executable, script.name], workdir, block.name, _cached_env())
    assert result.stdout.strip(), f"{block.name} printed nothing"
    return result.stdout


# ----------------------------------------------------------------------------- pip install


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_pip_install(argv: list[str]) -> None:
    """Each requirement the command names is installed in a version it allows (extras included)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted: list[str] = []
    for arg in argv[2:]:
        if arg.startswith("-"):
            continue
        if arg == "." or arg.startswith(".["):
            extras = re.findall(r"[\w-]+", arg[2:-1]) if arg.startswith(".[") else []
            assert importlib.metadata.version(project["name"])
            wanted += project["dependencies"]
            for extra in extras:
                assert extra in project["optional-dependencies"], f"pyproject has no extra {extra!r}"
                wanted += project["optional-dependencies"][extra]
        else:
            wanted.append(arg)
    missing = []
    for text in wanted:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if installed not in requirement.specifier:
            missing.append(f"{text} (installed {installed})")
    assert not missing, (f"`{shlex.join(argv)}` would install what this environment lacks: {missing}; a "
                         "block that cannot run here needs <!-- doc-test: skip (reason) --> before it")


# ----------------------------------------------------------------------------- the tests

BLOCKS = [block for path in DOCS for block in extract_blocks(path)]
README_PYTHON = next(b for b in BLOCKS if b.path.name == "README.md" and "import Engine" in b.code)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b is not README_PYTHON], ids=lambda b: b.name)
def test_doc_block(block, workdir, servers):
    if block.skip:
        pytest.skip(block.skip)
    if block.kind == "shell":
        run_shell_block(block, workdir, servers)
    else:
        run_python_block(block, workdir, servers)


def test_readme_python_example_prints_text(workdir, servers):
    """The first thing a reader runs: a plain interpreter, no JAX flags, one CPU device to start with."""
    out = run_python_block(README_PYTHON, workdir, servers)
    assert len(out.strip()) > 20, out


def test_extraction_rules(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\njdisagg launch &   # a server\njdisagg generate \\\n  \"hi\" && echo ok\n```\n\n"
        "<!-- doc-test: skip (needs a GPU) -->\n```python\nprint(1)\n```\n"
        "```text\nnot code\n```\n```\nnor this\n```\n"
    )
    shell, python = extract_blocks(page)
    assert (shell.kind, shell.skip, python.kind, python.skip) == ("shell", None, "python", "needs a GPU")
    assert shell_commands(shell.code) == [
        ("jdisagg launch", True), ('jdisagg generate "hi"', False), ("echo ok", False)
    ]
    ports = fresh_ports()
    grpc_port = ports[PORT_DEFAULTS["port"]]
    assert add_port_flags(["jdisagg", "generate", "x"], ports)[-2:] == ["--server", f"127.0.0.1:{grpc_port}"]
    assert "--port" in add_port_flags(["jdisagg", "launch"], ports)
    text = "curl localhost:50051/x --rate 50051"
    assert map_ports(text, ports) == f"curl localhost:{grpc_port}/x --rate 50051"
    assert cap_bench(["jdisagg", "bench", "--num-requests", "200"])[-1] == str(BENCH_REQUESTS_CAP)


# ----------------------------------------------------------------------------- what a new user meets


def _third_party_imports(directory: Path) -> set[str]:
    names = set()
    for file in directory.rglob("*.py"):
        if "_pb2" in file.name:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "jdisagg"}


def test_every_import_is_declared():
    """A package that only arrives through another's dependencies can vanish with its next release."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for rs in extras for r in rs)]
    declared = {_normal(_requirement_name(r)) for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for directory in ("jdisagg", "kernels", "meshes"):
        for module in _third_party_imports(ROOT / directory):
            names = {_normal(d) for d in distributions.get(module, [module])}
            if not names & declared:
                undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_readme_metrics_table_lists_every_metric():
    """Each row: name, type, unit; the names and types are what the engine exports."""
    from jdisagg.metrics import EngineMetrics
    from jdisagg.scheduler import Scheduler, SchedulerConfig

    metrics = EngineMetrics("m", lambda: 0)
    # The scheduler's totals (prefix cache, local vs remote prefills) are exported once an engine's
    # scheduler is watched, as every engine does at start.
    metrics.watch_scheduler(Scheduler(SchedulerConfig(16, 1, 32), prefill_replicas=[0], decode_pages={0: 4}))
    exported = {}
    for family in metrics.registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        exported[family.name + suffix] = family.type
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\|\s*`(jdisagg_\w+)`\s*\|\s*(\w+)\s*\|\s*([^|]+?)\s*\|", text, flags=re.M)
    documented = {name: kind for name, kind, _unit in rows}
    assert documented == exported
    assert all(unit for _name, _kind, unit in rows)


@pytest.fixture(scope="module")
def tokenizer_less_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny HF checkpoint with a 300-token vocabulary but no tokenizer.json, and its tokenizer elsewhere."""
    import dataclasses

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jdisagg.models.demo import DEMO_CONFIG
    from jdisagg.models.loading import init_model, save_hf_safetensors

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, the world says hello"] * 20, trainer)
    elsewhere = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(elsewhere))
    config = dataclasses.replace(DEMO_CONFIG, vocab_size=300, hidden_size=64, intermediate_size=128,
                                 num_layers=1, num_heads=2, num_kv_heads=2, max_position_embeddings=64)
    checkpoint = tmp_path_factory.mktemp("checkpoint") / "tiny-bpe"
    save_hf_safetensors(init_model(config, 0), checkpoint)
    return checkpoint, elsewhere


def test_launch_with_a_separate_tokenizer(tokenizer_less_checkpoint, workdir, tmp_path):
    """--tokenizer serves a checkpoint without tokenizer.json; --served-model-name labels the metrics."""
    from jdisagg.serving.client import make_request
    from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

    checkpoint, tokenizer = tokenizer_less_checkpoint
    small = ["--prefill-mesh", "1x1", "--decode-mesh", "1x1", "--max-context", "32", "--max-batch", "1"]
    ports = {dest: _free_port() for dest in PORT_DEFAULTS}  # not the shared servers'
    port_flags = [a for dest, port in ports.items() for a in (f"--{dest.replace('_', '-')}", str(port))]
    refused = subprocess.run(["jdisagg", "launch", "--model", str(checkpoint), *small, *port_flags],
                             cwd=workdir, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert refused.returncode == 2 and "--tokenizer PATH" in refused.stderr.strip().splitlines()[-1]

    pool = Servers(tmp_path)
    pool.ensure(["jdisagg", "launch", "--model", str(checkpoint), "--tokenizer", str(tokenizer),
                 "--served-model-name", "tiny", *small, *port_flags])
    grpc_port, metrics_port = ports["port"], ports["metrics_port"]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = make_request("hello world", max_tokens=6, ignore_eos=True)
            reply = pb_grpc.GenerationStub(channel).GenerateUnary(request, timeout=120)
        assert reply.usage.prompt_tokens < len("hello world")  # BPE merges: not bytes
        assert len(reply.token_ids) == 6 and reply.text
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            families = list(text_string_to_metric_families(response.read().decode()))
        labelled = [s for f in families if f.name.startswith("jdisagg_") for s in f.samples]
        assert labelled and all(s.labels.get("model_name") == "tiny" for s in labelled)
        assert {f.name: f.type for f in families}["jdisagg_compilations"] == "counter"
    finally:
        problems = pool.stop_all()
    assert not problems, problems


def test_engine_names_the_fix_when_jax_started_too_small(workdir):
    """After a JAX operation the CPU can no longer be split: the error says what to call first."""
    code = ("import jax, jax.numpy as jnp\njnp.zeros(1)\nfrom jdisagg import Engine\n"
            "Engine(prefill_mesh='4x1', decode_mesh='2x2')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=_user_env(), capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_S)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("ValueError"), result.stderr[-2000:]
    assert 'jax.config.update("jax_num_cpu_devices", 8)' in last


def test_info_splits_the_cpu_for_meshes_above_eight_devices(workdir):
    argv = ["jdisagg", "info", "--prefill-mesh", "8x1", "--decode-mesh", "4x2"]
    result = _run(argv, workdir, "jdisagg info")
    assert result.stdout.startswith("devices: 16 cpu device(s)")
