"""The ``jdisagg`` command: ``launch`` a server, ``generate`` from one, ``info`` on a layout.

Only argument parsing lives here; each subcommand's work is imported when it runs, so ``--help`` and
``generate`` never pay for importing JAX.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

_PROG = "jdisagg"


class _Parser(argparse.ArgumentParser):
    """Errors as one line, ``jdisagg: error: <reason>``, exit 2: scripts grep it; usage is in --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{_PROG}: error: {message} (see '{self.prog} --help')\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text}")
    return value


def _add_layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory: HF (config.json + safetensors) or a jdisagg/orbax checkpoint "
                        "(default: the built-in demo model)")
    p.add_argument("--prefill-mesh", metavar="TPxDP", default=None,
                   help="prefill devices as TPxDP (tensor-parallel degree x replicas), e.g. 4x1, or "
                        "tp=4,dp=1 "
                        "(default: 4x1 when 8 devices are visible, else what fits)")
    p.add_argument("--decode-mesh", metavar="TPxDP", default=None,
                   help="decode devices as TPxDP, e.g. 2x2 = two independent replicas of 2-way tensor "
                        "parallelism (default: 2x2 when 8 devices are visible, else what fits)")
    p.add_argument("--colocate", action="store_true",
                   help="put prefill and decode on the same devices instead of disjoint ones (the baseline "
                        "disaggregation is measured against)")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """Serving dtypes and the compile cache: the same flags on a launch and on a worker."""
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="params and activations; auto: bfloat16 on GPU/TPU, the checkpoint's dtype on CPU "
                        "(default: %(default)s)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="KV-cache pages: the model's dtype (auto) or bfloat16 (default: %(default)s)")
    p.add_argument("--compile-cache", metavar="DIR|off", default=None,
                   help="JAX persistent compilation cache: a second launch with the same model, meshes "
                        "and sizes loads its programs instead of compiling them (default: "
                        "$XDG_CACHE_HOME/jdisagg/xla, i.e. ~/.cache/jdisagg/xla)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Disaggregated prefill/decode LLM serving on JAX.")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    launch = subs.add_parser(
        "launch", help="start a gRPC server", description=(
            "Load a model, compile its prefill and decode programs on their meshes and serve jdisagg.v1."
            "Generation over gRPC (with health and reflection) until SIGTERM/SIGINT, then drain. Without an "
            "accelerator the host CPU is split into 8 virtual devices."))
    _add_layout_flags(launch)
    launch.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="a tokenizer.json, or a directory holding one, for a checkpoint that has none "
                             "(default: the one in --model; bytes for a 256-token vocabulary)")
    launch.add_argument("--served-model-name", metavar="NAME", default=None,
                        help="the model_name label on every metric (default: the --model directory's name, "
                             "demo for the built-in model)")
    launch.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    launch.add_argument("--port", type=_port, default=50051,
                        help="gRPC port; 0 picks a free one (default: %(default)s)")
    launch.add_argument("--metrics-port", type=_port, default=9400,
                        help="port of the Prometheus /metrics endpoint; 0 turns it off "
                             "(default: %(default)s)")
    launch.add_argument("--http-port", type=_port, default=8000,
                        help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                             "/v1/models, /health); 0 turns it off (default: %(default)s)")
    launch.add_argument("--chat-template", metavar="FILE", default=None,
                        help="a Jinja chat template replacing the model's own (tokenizer_config.json's "
                             "chat_template) for /v1/chat/completions")
    launch.add_argument("--max-batch", type=_positive, default=8,
                        help="sequences per decode replica and step (default: %(default)s)")
    launch.add_argument("--page-size", type=_positive, default=16,
                        help="tokens per KV-cache page, a power of two (default: %(default)s)")
    launch.add_argument("--num-pages", type=_positive, default=None,
                        help="KV-cache pages per decode replica; overrides --kv-cache-gb and "
                             "--memory-fraction")
    launch.add_argument("--max-context", type=_positive, default=None,
                        help="longest sequence, prompt + output, a multiple of --page-size (default: the "
                             "model's positions, lowered to what the KV budget holds)")
    _add_model_flags(launch)
    launch.add_argument("--kv-cache-gb", type=_positive_float, default=None, metavar="GB",
                        help="KV-cache budget per decode device in GiB: the way to size the cache on CPU, "
                             "which reports no memory (default on CPU: every batch slot holds a full "
                             "context)")
    launch.add_argument("--memory-fraction", type=_fraction, default=None, metavar="F",
                        help="GPU/TPU: share of each decode device's memory for params, KV cache and "
                             "workspace; the KV cache gets what is left (default: 0.9)")
    launch.add_argument("--max-queue", type=_positive, default=256,
                        help="requests waiting for prefill before new ones get RESOURCE_EXHAUSTED "
                             "(default: %(default)s)")
    launch.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="do not reuse the KV of full pages a decode replica already holds for a "
                             "prompt's prefix: every prompt's KV is computed and handed off in full")
    launch.add_argument("--prefill-cache-gb", type=_non_negative_float, default=None, metavar="GB",
                        help="KV each prefill replica keeps of long prompts' leading chunks, so a prompt "
                             "sharing them is prefilled only from its first uncached chunk; 0: off (default: "
                             "one full context of KV; off with --colocate or --no-prefix-cache; worker "
                             "processes always use the default)")
    launch.add_argument("--local-prefill-tokens", type=_non_negative, default=None, metavar="N",
                        help="prefill a prompt on its decode replica, in chunks between decode steps, when "
                             "at most N of its tokens are uncached; 0: never (default: 0, but every prompt "
                             "with --colocate on GPU/TPU: chunked prefill; on the CPU a colocated prompt "
                             "prefills whole beside the decode steps, measured faster there)")
    launch.add_argument("--step-token-budget", type=_positive, default=512, metavar="N",
                        help="prompt tokens prefilled locally per decode step (default: %(default)s)")
    launch.add_argument("--attention-backend", default=None,
                        help="paged-attention implementation in jdisagg.kernels "
                             "(default: chosen by platform)")
    launch.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to let in-flight requests finish on SIGTERM/SIGINT before aborting "
                             "them (default: %(default)s)")
    launch.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars while placing weights and compiling")
    procs = launch.add_argument_group(
        "multi-process", "Run every prefill and decode replica as its own worker process (one per DP "
        "replica, each owning TP devices); this process schedules and serves gRPC. Workers on other hosts "
        "join with `jdisagg worker --join HOST:PORT`.")
    procs.add_argument("--processes", action="store_true",
                       help="spawn the workers as child processes of this host")
    procs.add_argument("--control-port", type=_port, default=0,
                       help="port workers join on (default: a free one, printed at start)")
    procs.add_argument("--prefill-cpus", metavar="LIST", default=None,
                       help="pin prefill workers to these CPU cores, e.g. 0-3 (default: no pinning)")
    procs.add_argument("--decode-cpus", metavar="LIST", default=None,
                       help="pin decode workers to these CPU cores, e.g. 4-7 (default: no pinning)")
    procs.add_argument("--worker-devices", type=_positive, default=None,
                       help="CPU only: virtual devices per worker process (default: its role's TP)")
    launch.set_defaults(run=_launch)

    worker = subs.add_parser(
        "worker", help="start a prefill or decode worker that joins a front", description=(
            "Own this process's devices as one prefill or decode replica of a `jdisagg launch --processes` "
            "front: fetch the serving settings from the front, load and compile, register, then serve the "
            "internal worker API until SIGTERM/SIGINT."))
    worker.add_argument("--role", choices=("prefill", "decode"), required=True, help="which phase to run")
    worker.add_argument("--join", metavar="HOST:PORT", required=True,
                        help="the front's control address (printed by `jdisagg launch --processes`)")
    worker.add_argument("--host", default="127.0.0.1",
                        help="address this worker listens on, reachable from the front "
                             "(default: %(default)s)")
    worker.add_argument("--port", type=_port, default=0, help="worker API port (default: a free one)")
    worker.add_argument("--model", metavar="DIR", default=None,
                        help="checkpoint directory if it lies elsewhere on this host (default: the front's)")
    worker.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="a tokenizer.json, or a directory holding one, for a checkpoint that has none")
    worker.add_argument("--devices", type=_positive, default=None,
                        help="CPU only: split the host into this many virtual devices "
                             "(default: the role's TP)")
    worker.add_argument("--cpus", metavar="LIST", default=None,
                        help="pin this process to CPU cores, e.g. 0-3")
    worker.add_argument("--offer-timeout", type=float, default=None,
                        help="seconds a prefill worker keeps KV offered that no decode worker pulls "
                             "(default: the front's, 60 s unless it was started with another)")
    _add_model_flags(worker)
    worker.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    worker.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(run=_worker)

    bench = subs.add_parser(
        "bench", help="load-test a running server", description=(
            "Send a seeded synthetic workload to a jdisagg server over gRPC and report throughput, TTFT, "
            "TPOT, inter-token and end-to-end latency (mean/p50/p90/p99) and goodput under SLOs. Prompts are "
            "random token ids; outputs ignore EOS so each request yields exactly its drawn length."))
    bench.add_argument("--server", default="127.0.0.1:50051", help="gRPC address (default: %(default)s)")
    bench.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                       help="the API to drive: jdisagg's gRPC at --server, or the OpenAI-compatible HTTP API "
                            "at --base-url (streamed /v1/completions) (default: %(default)s)")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="the HTTP API with --backend openai (default: %(default)s)")
    bench.add_argument("--num-requests", type=_positive, default=100,
                       help="measured requests (default: %(default)s)")
    bench.add_argument("--warmup", type=_integer, default=4,
                       help="requests sent first, one at a time, and left out of every number "
                            "(default: %(default)s)")
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=math.inf,
                      help="arrivals per second (default: all at once)")
    load.add_argument("--concurrency", type=_positive, default=None,
                      help="keep this many requests in flight instead of an arrival rate")
    bench.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape of the inter-arrival gaps: 1 is Poisson, < 1 burstier "
                            "(default: %(default)s)")
    bench.add_argument("--prompt-len", default="32", metavar="N|LO:HI",
                       help="prompt tokens, fixed or uniform (default: %(default)s)")
    bench.add_argument("--output-len", default="64", metavar="N|LO:HI",
                       help="output tokens, fixed or uniform (default: %(default)s)")
    bench.add_argument("--long-fraction", type=float, default=0.0,
                       help="share of requests with long prompts, e.g. 0.1 (default: %(default)s)")
    bench.add_argument("--long-prompt-len", default="768", metavar="N|LO:HI",
                       help="prompt tokens of the long requests (default: %(default)s)")
    bench.add_argument("--long-output-len", default=None, metavar="N|LO:HI",
                       help="output tokens of the long requests (default: --output-len)")
    bench.add_argument("--workload", choices=("random", "chat"), default="random",
                       help="random: independent prompts (the flags above); chat: --conversations concurrent "
                            "multi-turn chats, each turn's prompt the previous prompt + its answer + a new "
                            "message, all after one shared system prompt (what a prefix cache is for; with "
                            "--metrics-url it reports the hit rate and KV handed off per request) "
                            "(default: %(default)s)")
    bench.add_argument("--conversations", type=_positive, default=8,
                       help="chat: conversations at once (default: %(default)s)")
    bench.add_argument("--turns", type=_positive, default=4, help="chat: turns each (default: %(default)s)")
    bench.add_argument("--system-prompt-len", type=_integer, default=512,
                       help="chat: tokens of the system prompt every conversation starts with "
                            "(default: %(default)s)")
    bench.add_argument("--message-len", default="32", metavar="N|LO:HI",
                       help="chat: the user's new tokens per turn; answers take --output-len "
                            "(default: %(default)s)")
    bench.add_argument("--vocab-size", type=_positive, default=256,
                       help="prompt token ids are drawn from [0, this) (default: %(default)s, the demo's)")
    bench.add_argument("--seed", type=_integer, default=0, help="seed of lengths, tokens and arrivals")
    bench.add_argument("--slo-ttft", type=float, default=None, metavar="MS", help="TTFT SLO for goodput")
    bench.add_argument("--slo-tpot", type=float, default=None, metavar="MS", help="TPOT SLO for goodput")
    bench.add_argument("--metrics-url", default=None,
                       help="the server's Prometheus endpoint, e.g. http://127.0.0.1:9400/metrics: report "
                            "its own latency means over the same requests next to ours")
    bench.add_argument("--json", metavar="PATH", default=None, help="write the full summary as JSON")
    bench.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    bench.set_defaults(run=_bench)

    gen = subs.add_parser(
        "generate", help="stream a completion from a server", description=(
            "Send one prompt to a running server and stream the generated text to stdout as it arrives. "
            "Sampling flags left out use the server's defaults."))
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--server", default="127.0.0.1:50051",
                     help="HOST:PORT of the server (default: %(default)s)")
    gen.add_argument("--max-tokens", type=int, default=None,
                     help="tokens to generate at most (server default 16)")
    gen.add_argument("--temperature", type=float, default=None, help="0 is greedy (server default 0)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens; 0 disables (server default 0)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling mass in (0, 1]; 1 disables (server default 1)")
    gen.add_argument("--seed", type=int, default=None,
                     help="makes sampling reproducible, in [0, 2**32) (default: random)")
    gen.add_argument("--stop", action="append", default=[], metavar="S",
                     help="stop when the text contains S (not printed); repeat for several")
    gen.add_argument("--timeout", type=float, default=300.0,
                     help="deadline of the request in seconds (default: %(default)s)")
    gen.set_defaults(run=_generate)

    info = subs.add_parser(
        "info", help="show devices, meshes and per-phase shardings", description=(
            "Print the visible devices, the prefill and decode meshes the flags give, and how each "
            "parameter and the KV cache are sharded in each phase. Loads no weights."))
    _add_layout_flags(info)
    info.set_defaults(run=_info)
    return parser


def _launch(args: argparse.Namespace) -> int:
    from jdisagg.serving.launch import LaunchError, LaunchOptions, launch

    opts = LaunchOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})
    try:
        return launch(opts)
    except LaunchError as exc:
        return _fail(2, str(exc))


def _worker(args: argparse.Namespace) -> int:
    from jdisagg.workers.worker import WorkerOptions, WorkerStartError, run_worker

    opts = WorkerOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})
    try:
        return run_worker(opts)
    except WorkerStartError as exc:
        return _fail(2, str(exc))


def _bench(args: argparse.Namespace) -> int:
    from jdisagg.bench import BenchOptions, Lengths, Workload, format_summary, run_bench, write_json

    try:
        workload = Workload(
            Lengths.parse(args.prompt_len), Lengths.parse(args.output_len), args.long_fraction,
            Lengths.parse(args.long_prompt_len) if args.long_fraction else None,
            Lengths.parse(args.long_output_len) if args.long_output_len else None, args.vocab_size,
        )
        if not 0 <= args.long_fraction <= 1 or args.burstiness <= 0 or args.rate <= 0:
            raise ValueError("want 0 <= --long-fraction <= 1, --burstiness > 0 and --rate > 0")
    except ValueError as exc:
        return _fail(2, str(exc))
    opts = BenchOptions(
        args.server, workload, args.num_requests, args.rate, args.burstiness, args.concurrency, args.warmup,
        args.seed, args.slo_ttft, args.slo_tpot, args.metrics_url, progress=args.progress,
        backend=args.backend, base_url=args.base_url,
    )
    try:
        if args.workload == "chat":
            from jdisagg.bench_chat import ChatWorkload, format_chat_summary, run_chat_bench

            chat = ChatWorkload(args.conversations, args.turns, args.system_prompt_len,
                                Lengths.parse(args.message_len), workload.output, args.vocab_size)
            summary = run_chat_bench(opts, chat)
        else:
            summary = run_bench(opts)
    except ValueError as exc:
        return _fail(2, str(exc))
    except OSError as exc:
        return _fail(1, f"cannot reach the server or its metrics: {exc}")
    print(format_summary(summary))
    if args.workload == "chat":
        print(format_chat_summary(summary))
    if args.json:
        write_json(summary, args.json)
    if summary["succeeded"] == 0:
        return _fail(1, f"no request succeeded: {summary['failed']}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from jdisagg.serving.client import make_request
    from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

    request = make_request(
        args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop,
    )
    with grpc.insecure_channel(args.server) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request, timeout=args.timeout)
        wrote = False
        try:
            for response in call:
                sys.stdout.write(response.text)
                sys.stdout.flush()
                wrote = wrote or bool(response.text)
        except grpc.RpcError as exc:
            return _fail(1, f"{exc.code().name}: {exc.details()}", newline=wrote)
        except KeyboardInterrupt:
            call.cancel()  # frees the request's KV pages on the server now
            return 130
    sys.stdout.write("\n")
    return 0


def _info(args: argparse.Namespace) -> int:
    from jdisagg.serving.devices import (
        choose_meshes,
        describe_devices,
        host_devices_for,
        request_host_devices,
    )

    request_host_devices(host_devices_for(args.prefill_mesh, args.decode_mesh, args.colocate))
    import jax

    from jdisagg.meshes import build_layout
    from jdisagg.serving.plan import model_config, sharding_table

    meshes = choose_meshes(args.prefill_mesh, args.decode_mesh, args.colocate, jax.device_count())
    try:
        layout = build_layout(meshes.prefill, meshes.decode, colocate=meshes.colocate)
        config = model_config(args.model)
        table = sharding_table(config, layout)
    except (ValueError, OSError) as exc:
        return _fail(2, str(exc))
    print(f"devices: {describe_devices()}")
    print(f"meshes: prefill {meshes.prefill}, decode {meshes.decode}")
    print(layout.describe())
    print(f"model: {args.model or 'built-in demo'} ({config.num_layers} layers, {config.num_heads} heads, "
          f"{config.num_kv_heads} kv heads, vocab {config.vocab_size})")
    print(table)
    return 0


def _fail(code: int, message: str, newline: bool = False) -> int:
    """Report on stderr; ``newline`` ends a partly streamed line on stdout first."""
    if newline:
        sys.stdout.write("\n")
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger(_PROG).setLevel(logging.INFO)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
