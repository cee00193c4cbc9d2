"""``jdisagg bench``: a load generator that measures a running server the way serving engineers do.

It speaks gRPC (``--backend grpc``, jdisagg's own API) or the OpenAI-compatible HTTP API (``--backend
openai``: streamed ``/v1/completions``), with the same workloads and numbers, so the two fronts of one server
can be compared.

Arrivals are Poisson (``--burstiness 1``) or gamma (< 1 burstier, > 1 smoother) at ``--rate`` requests/s,
or a fixed ``--concurrency``. Lengths are fixed (``32``) or uniform (``16:64``), with an optional share of
long prompts (``--long-fraction``) for the mixed chat + documents workload; every draw is seeded. Outputs
ignore EOS so every request produces exactly its drawn output length. Warm-up requests run first and are
left out of every number, on both sides.

Reported per run: request and token throughput; TTFT, TPOT (first token excluded), inter-token latency and
end-to-end latency as mean/p50/p90/p99; goodput (requests/s meeting every SLO given); and, with
``--metrics-url``, the server's own means over the same requests next to ours.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import grpc
from tqdm import tqdm

from jdisagg.serving.client import make_request
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Lengths:
    """A fixed length or a uniform range, parsed from ``"32"`` or ``"16:64"``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Lengths:
        lo, _, hi = text.partition(":")
        low, high = int(lo), int(hi or lo)
        if not 1 <= low <= high:
            raise ValueError(f"lengths {text!r}: want N or LOW:HIGH with 1 <= LOW <= HIGH")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Workload:
    prompt: Lengths
    output: Lengths
    long_fraction: float = 0.0
    long_prompt: Lengths | None = None
    long_output: Lengths | None = None
    vocab_size: int = 256


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int
    long: bool


def make_requests(workload: Workload, count: int, seed: int) -> list[BenchRequest]:
    """``count`` requests drawn from ``workload`` with ``seed`` (the same seed gives the same requests)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        long = workload.long_prompt is not None and rng.random() < workload.long_fraction
        prompt = workload.long_prompt if long else workload.prompt
        output = (workload.long_output or workload.output) if long else workload.output
        ids = [rng.randrange(workload.vocab_size) for _ in range(prompt.draw(rng))]
        out.append(BenchRequest(ids, output.draw(rng), long))
    return out


def arrival_offsets(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: gamma-distributed gaps with mean 1/rate
    (shape ``burstiness``; 1 is Poisson). ``rate`` inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


@dataclass
class Record:
    """One request as the client saw it (``time.perf_counter`` seconds)."""

    sent: float
    long: bool
    prompt_tokens: int
    status: str = "OK"
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # what was streamed (a chat's next turn repeats it)
    done: float = 0.0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def e2e(self) -> float:
        return self.done - self.sent


def send(stub: pb_grpc.GenerationStub, request: BenchRequest, timeout: float) -> Record:
    record = Record(time.perf_counter(), request.long, len(request.prompt_ids))
    try:
        for response in stub.Generate(
            make_request(request.prompt_ids, max_tokens=request.max_tokens, ignore_eos=True), timeout=timeout
        ):
            now = time.perf_counter()
            record.token_times += [now] * len(response.token_ids)
            record.token_ids += response.token_ids
    except grpc.RpcError as exc:
        record.status = exc.code().name
    record.done = time.perf_counter()
    return record


def send_openai(base_url: str, model: str, request: BenchRequest, timeout: float) -> Record:
    """One streamed ``/v1/completions`` request; tokens are counted from each chunk's ``token_ids``.

    Greedy, as the gRPC backend's requests are (the server's gRPC default; OpenAI's default samples).
    """
    body = {"model": model, "prompt": request.prompt_ids, "max_tokens": request.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    http_request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                          headers={"Content-Type": "application/json"})
    record = Record(time.perf_counter(), request.long, len(request.prompt_ids))
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as response:
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    record.status = event["error"].get("type") or "ERROR"
                    break
                now = time.perf_counter()
                ids = [t for c in event["choices"] for t in c.get("token_ids", ())]
                record.token_times += [now] * len(ids)
                record.token_ids += ids
    except urllib.error.HTTPError as exc:
        record.status = f"HTTP_{exc.code}"
    except OSError as exc:  # refused, reset, timed out
        record.status = type(exc).__name__
    record.done = time.perf_counter()
    return record


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The model id an OpenAI-compatible server lists first."""
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=timeout) as response:
        models = json.loads(response.read())["data"]
    if not models:
        raise OSError(f"{base_url}/v1/models lists no model")
    return models[0]["id"]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """mean/p50/p90/p99 in milliseconds (nearest-rank percentiles), or None without values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    return {"mean": statistics.fmean(ordered) * 1e3, "p50": rank(50) * 1e3, "p90": rank(90) * 1e3,
            "p99": rank(99) * 1e3}


def latencies(records: Sequence[Record]) -> dict[str, dict[str, float] | None]:
    """TTFT, TPOT, inter-token and end-to-end latency percentiles of successful ``records``."""
    return {
        "ttft_ms": percentiles([r.ttft for r in records if r.ttft is not None]),
        "tpot_ms": percentiles([r.tpot for r in records if r.tpot is not None]),
        "itl_ms": percentiles([x for r in records for x in r.itls]),
        "e2e_ms": percentiles([r.e2e for r in records]),
    }


def summarize(records: Sequence[Record], duration: float, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> dict:
    """Throughput, latency percentiles (all requests, and short vs long prompts when the workload mixes
    them: a long prompt's stream carries its KV hand-off, a short one shows what it does to the others)."""
    ok = [r for r in records if r.status == "OK"]
    short, long = [r for r in ok if not r.long], [r for r in ok if r.long]
    output_tokens = sum(len(r.token_times) for r in ok)

    def meets(r: Record) -> bool:
        ttft_ok = slo_ttft_ms is None or (r.ttft is not None and r.ttft * 1e3 <= slo_ttft_ms)
        tpot_ok = slo_tpot_ms is None or r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms
        return ttft_ok and tpot_ok

    return {
        "requests": len(records),
        "succeeded": len(ok),
        "failed": {s: sum(r.status == s for r in records) for s in {r.status for r in records} - {"OK"}},
        "duration_s": duration,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        **latencies(ok),
        "by_prompt": {"short": latencies(short), "long": latencies(long)} if short and long else None,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput": sum(meets(r) for r in ok) / duration,
    }


_SERVER_HISTOGRAMS = {
    "ttft_ms": "jdisagg_time_to_first_token_seconds",
    "tpot_ms": "jdisagg_time_per_output_token_seconds",
    "e2e_ms": "jdisagg_e2e_request_latency_seconds",
}


def scrape(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's latency histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for key, name in _SERVER_HISTOGRAMS.items():
            if family.name == name:
                values = {s.name: s.value for s in family.samples}
                found[key] = (values[name + "_sum"], values[name + "_count"])
    return found


@dataclass(frozen=True)
class BenchOptions:
    server: str
    workload: Workload
    num_requests: int = 100
    rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None  # fixed concurrency instead of an arrival rate
    warmup: int = 4
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    metrics_url: str | None = None
    timeout_s: float = 600.0
    progress: bool = True
    backend: str = "grpc"  # or "openai": the HTTP API at base_url
    base_url: str = "http://127.0.0.1:8000"


@contextmanager
def sender(opts: BenchOptions) -> Iterator[Callable[[BenchRequest], Record]]:
    """How one request is sent and timed, for the chosen backend."""
    if opts.backend == "openai":
        base_url = opts.base_url.rstrip("/").removesuffix("/v1")
        model = served_model(base_url)
        yield lambda request: send_openai(base_url, model, request, opts.timeout_s)
        return
    with grpc.insecure_channel(opts.server) as channel:
        stub = pb_grpc.GenerationStub(channel)
        yield lambda request: send(stub, request, opts.timeout_s)


def run_bench(opts: BenchOptions) -> dict:
    """Run warm-up, then the measured requests; returns the summary (JSON-ready)."""
    requests = make_requests(opts.workload, opts.warmup + opts.num_requests, opts.seed)
    warmup, measured = requests[: opts.warmup], requests[opts.warmup :]
    with sender(opts) as send_one:
        for request in warmup:
            send_one(request)
        before = scrape(opts.metrics_url) if opts.metrics_url else {}
        bar = tqdm(total=len(measured), desc="bench", unit="req", disable=not opts.progress)
        records: list[Record] = []
        lock = threading.Lock()

        def one(request: BenchRequest) -> None:
            record = send_one(request)
            with lock:
                records.append(record)
            bar.update()

        start = time.perf_counter()
        if opts.concurrency:
            pending = iter(measured)

            def loop() -> None:
                while (request := next(pending, None)) is not None:
                    one(request)

            with ThreadPoolExecutor(opts.concurrency) as pool:
                for _ in range(opts.concurrency):
                    pool.submit(loop)
        else:
            offsets = arrival_offsets(len(measured), opts.rate, opts.burstiness, opts.seed)
            with ThreadPoolExecutor(min(len(measured), 512)) as pool:
                for offset, request in zip(offsets, measured, strict=True):
                    delay = start + offset - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(one, request)
        duration = time.perf_counter() - start
        bar.close()
    summary = summarize(records, duration, opts.slo_ttft_ms, opts.slo_tpot_ms)
    summary["config"] = {k: v for k, v in asdict(opts).items() if k not in ("progress",)}
    if opts.metrics_url:
        after = scrape(opts.metrics_url)
        counts = {key: after[key][1] - before.get(key, (0, 0))[1] for key in after}
        summary["server_requests"] = {key: int(n) for key, n in counts.items()}
        summary["server_ms"] = {
            key: 1e3 * (after[key][0] - before.get(key, (0, 0))[0]) / n for key, n in counts.items() if n > 0
        }
        summary["server_over_client"] = {
            key: summary["server_ms"][key] / summary[key]["mean"]
            for key in summary["server_ms"] if summary.get(key)
        }
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"requests: {s['succeeded']}/{s['requests']} ok in {s['duration_s']:.1f} s"
        + (f", failed {s['failed']}" if s["failed"] else ""),
        f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
        f"{s['total_token_throughput']:.1f} total tok/s",
        f"{'ms':>6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}"
        + ("   server mean (server/client)" if "server_ms" in s else ""),
    ]
    def row(label: str, p: dict[str, float]) -> str:
        return f"{label:>6} {p['mean']:9.2f} {p['p50']:9.2f} {p['p90']:9.2f} {p['p99']:9.2f}"

    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        if s.get(key):
            line = row(label, s[key])
            if key in s.get("server_ms", {}):
                line += f"   {s['server_ms'][key]:9.2f} ({s['server_over_client'][key]:.3f}x)"
            lines.append(line)
    for kind, part in (s.get("by_prompt") or {}).items():
        if part["tpot_ms"]:
            lines.append(row("TPOT", part["tpot_ms"]) + f"   {kind} prompts only")
    slo = s["slo"]
    if slo["ttft_ms"] is not None or slo["tpot_ms"] is not None:
        lines.append(f"goodput: {s['goodput']:.2f} req/s meeting TTFT <= {slo['ttft_ms']} ms, "
                     f"TPOT <= {slo['tpot_ms']} ms")
    return "\n".join(lines)


def write_json(summary: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=str)
