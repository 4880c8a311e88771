"""Benchmark `baichuan serve` over loopback: continuous batching throughput, time to first token, a soak, a fuzz.

The server runs in its own process (as `baichuan serve` would), the clients here with asyncio + httpx, so the
clients' Python does not share the server's GIL. Reported, in one run:

* sweep: aggregate completion tokens/s with 1, 4, 8, 16 concurrent streaming chat clients (each sends
  --requests requests one after another), its ratio to 1 client, and p50/p99 time to the first token;
* soak: --soak-clients clients for --soak-seconds, mixing chat/completions, streaming or not, with random
  lengths, and the clients a server meets in the wild: slow ones (a body trickled in pieces, an SSE stream read
  slowly), ones that go away (mid-stream, or before the answer), and oversize bodies (declared, never sent; or
  streamed past --max-request-bytes). Reported: requests, answers by status class, failures (an answer other
  than the one that kind of request must get), the server's RSS over time, and the rows and queue left once
  the soak drains (stuck rows: should be 0);
* fuzz (--fuzz): schemathesis over the served OpenAPI schema, counting 5xx answers. Fuzzed requests may ask
  for every token the context allows, so fuzz a tiny model (--max-seq-len 256), not the sweep's.

On a machine shared with other work, --threads 1 avoids OpenMP threads waiting on each other for the core.

Examples (a ~150M random model: Baichuan2's 125,696-token vocabulary, 8 layers of width 512; then a fuzz):
    PYTHONPATH=. python benchmarks/bench_serve.py --make-model /tmp/bench-serve-model --threads 1
    PYTHONPATH=. python benchmarks/bench_serve.py --model TINY --max-seq-len 256 --soak-seconds 0 --fuzz
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "长城", "a small robot", "春天的雨", "prime numbers", "北京的秋天", "coffee", "月亮"]


def make_model(directory: Path) -> Path:
    import torch

    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    if not (directory / "config.json").exists():
        config = preset("baichuan2-7b").replace(n_layers=8, dim=512, n_heads=8, ffn_dim=1376)
        print(f"writing a random {config.num_params() / 1e6:.0f}M-parameter checkpoint to {directory}")
        init_checkpoint(config, directory, dtype=torch.float32)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    code = (
        "from baichuan.serve.app import run; "
        f"run({str(args.model)!r}, port={port}, max_batch={args.max_batch}, max_queue={args.max_queue}, "
        f"max_seq_len={args.max_seq_len}, model_name='bench', dtype={args.dtype!r}, threads={args.threads}, "
        f"max_request_bytes={args.max_request_bytes}, log_level='warning')"
    )
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start within 300 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def messages_for(i: int) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    return [
        {"role": "user", "content": f"Write a short story about {topic}. 请讲一个关于{topic}的故事。 #{i}"}
    ]


async def stream_chat(http: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """One streaming chat request: (seconds to the first token, completion tokens)."""
    body = {
        "model": "bench",
        "messages": messages_for(i),
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens, done = None, None, False
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    if not done or tokens is None:
        raise RuntimeError("the stream ended without usage and [DONE]")
    return (first if first is not None else time.perf_counter() - start), tokens


async def sweep_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    tokens = 0

    async def client(c: int):
        nonlocal tokens
        async with httpx.AsyncClient(timeout=600) as http:
            for r in range(requests):
                ttft, n = await stream_chat(http, url, c * requests + r, max_tokens)
                ttfts.append(ttft)
                tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": clients * requests,
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
    }


# What a soak client sends, with its share of the requests and the statuses it must get (None: the connection
# ended before a status, which only the kinds that leave early or send too much may see).
SOAK_KINDS = {
    "plain": (0.55, {200}),  # chat or completions, streaming or not
    "slow reader": (0.08, {200}),  # an SSE stream read with pauses
    "trickled body": (0.08, {200}),  # the body sent in pieces over ~2 s
    "leaves mid-stream": (0.10, {200}),  # closes after the first tokens of a long answer
    "impatient": (0.07, {200, None}),  # gives up before a long non-streaming answer
    "oversize declared": (0.06, {413}),  # Content-Length over the limit; the body is never sent
    "oversize streamed": (0.06, {413, None}),  # a chunked body that passes the limit
}


async def raw_post(
    url: str, path: str, pieces: list[bytes], pause: float, length: int | None = None
) -> int | None:
    """POST over a bare socket, the body in `pieces` with `pause` s between them, or only the headers when
    `length` claims a body: the status, or None if the server closed the connection first."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    length = sum(map(len, pieces)) if length is None else length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        for piece in pieces:
            await writer.drain()
            await asyncio.sleep(pause)
            writer.write(piece)
        await writer.drain()
        status = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 300)).split()[1])
        await asyncio.wait_for(reader.read(), 300)  # the rest, until the server closes (Connection: close)
        return status
    except (ConnectionError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def soak(
    url: str, pid: int, clients: int, seconds: float, max_request_bytes: int, seed: int = 0
) -> dict:
    rng = random.Random(seed)
    kinds, weights = list(SOAK_KINDS), [share for share, _ in SOAK_KINDS.values()]
    outcomes: dict[str, dict[str, int]] = {kind: {} for kind in kinds}  # kind -> "2xx"/.../"no status" -> n
    closed: list[str] = []  # why oversize streamed bodies got no status
    failures: list[str] = []
    rss: list[tuple[float, float]] = []
    stop_at = time.monotonic() + seconds
    start = time.monotonic()

    async def plain(http: httpx.AsyncClient, i: int) -> int:
        max_tokens = rng.randint(4, 48)
        stream = rng.random() < 0.5
        if rng.random() < 0.7:
            if stream:
                await stream_chat(http, url, i, max_tokens)
                return 200
            body = {"model": "bench", "messages": messages_for(i), "max_tokens": max_tokens}
            response = await http.post(f"{url}/v1/chat/completions", json=body)
        else:
            body = {"model": "bench", "prompt": f"Once upon a time, 从前 #{i}", "max_tokens": max_tokens}
            if stream:
                body["stream"] = True
                async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    text = (await response.aread()).decode()
                if response.status_code == 200 and not text.rstrip().endswith("data: [DONE]"):
                    raise RuntimeError(f"the stream ended without [DONE]: {text[-80:]!r}")
                return response.status_code
            response = await http.post(f"{url}/v1/completions", json=body)
        if response.status_code == 200 and not response.json()["choices"]:
            raise RuntimeError(f"no choices: {response.text[:200]}")
        return response.status_code

    async def streamed(http: httpx.AsyncClient, i: int, pause: float, leave_after: int | None) -> int:
        """A streaming chat read line by line with `pause` s between lines; `leave_after` lines, then close."""
        body = {"model": "bench", "messages": messages_for(i), "max_tokens": 256 if leave_after else 32}
        body["stream"] = True
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines, done = 0, False
            async for line in response.aiter_lines():
                lines += 1
                done = done or line == "data: [DONE]"
                if leave_after is not None and lines >= leave_after:
                    return response.status_code  # closing the response drops the connection mid-stream
                await asyncio.sleep(pause)
            if response.status_code == 200 and not done:
                raise RuntimeError("a slowly read stream ended without [DONE]")
            return response.status_code

    async def one(http: httpx.AsyncClient, kind: str, i: int) -> int | None:
        if kind == "plain":
            return await plain(http, i)
        if kind == "slow reader":
            return await streamed(http, i, pause=0.05, leave_after=None)
        if kind == "leaves mid-stream":
            return await streamed(http, i, pause=0.0, leave_after=rng.randint(2, 8))
        if kind == "trickled body":
            raw = json.dumps({"model": "bench", "messages": messages_for(i), "max_tokens": 8}).encode()
            cuts = sorted(rng.sample(range(1, len(raw)), 7))
            pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            return await raw_post(url, "/v1/chat/completions", pieces, pause=0.25)
        if kind == "impatient":
            body = {"model": "bench", "messages": messages_for(i), "max_tokens": 256}
            try:
                response = await http.post(
                    f"{url}/v1/chat/completions", json=body, timeout=rng.uniform(0.1, 1)
                )
            except httpx.TimeoutException:
                return None
            return response.status_code
        if kind == "oversize declared":
            return await raw_post(
                url, "/v1/chat/completions", [], 0, length=max_request_bytes + rng.randint(1, 10**9)
            )

        async def chunks():  # chunked, no Content-Length: the server must count
            for _ in range(max_request_bytes // 65536 + 2):
                yield b"x" * 65536

        try:
            response = await http.post(f"{url}/v1/chat/completions", content=chunks())
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as error:
            closed.append(type(error).__name__)
            return None
        return response.status_code

    async def client(c: int) -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            i = 0
            while time.monotonic() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                try:
                    status = await one(http, kind, c * 100_000 + i)
                except Exception as error:  # noqa: BLE001 - every failure is counted and shown
                    status = None
                    failures.append(f"{kind}: {type(error).__name__}: {error}")
                else:
                    if status not in SOAK_KINDS[kind][1]:
                        failures.append(f"{kind}: status {status}")
                key = f"{status // 100}xx" if status is not None else "no status"
                outcomes[kind][key] = outcomes[kind].get(key, 0) + 1
                i += 1

    clients_done = asyncio.Event()

    async def watch() -> None:
        # Sampled until the last client is done, so the tail of the run (requests still in flight) is seen too.
        while not clients_done.is_set():
            rss.append((round(time.monotonic() - start, 1), round(rss_mib(pid), 1)))
            try:
                await asyncio.wait_for(clients_done.wait(), timeout=5)
            except asyncio.TimeoutError:
                pass

    async def all_clients() -> None:
        await asyncio.gather(*(client(c) for c in range(clients)))
        clients_done.set()

    await asyncio.gather(watch(), all_clients())
    seconds_run = round(time.monotonic() - start, 1)
    # Stuck rows: once every client is done, the engine must drain to nothing (cancelled rows freed too).
    async with httpx.AsyncClient(timeout=30) as http:
        deadline = time.monotonic() + 60
        while True:
            health = (await http.get(f"{url}/health")).json()
            if not (health["running"] or health["waiting"]) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    rss.append((round(time.monotonic() - start, 1), round(rss_mib(pid), 1)))
    # Once idle the server hands freed memory back (serve.engine.IDLE_RELEASE_S): what stays is what is alive.
    await asyncio.sleep(3)
    idle_rss = round(rss_mib(pid), 1)
    settled = [m for t, m in rss if t >= min(20.0, seconds / 4)] or [m for _, m in rss]
    return {
        "clients": clients,
        "seconds": seconds_run,
        "requests": sum(sum(counts.values()) for counts in outcomes.values()),
        "by_status": {
            key: sum(c.get(key, 0) for c in outcomes.values()) for key in ("2xx", "4xx", "5xx", "no status")
        },
        "by_kind": outcomes,
        "oversize_closed_by": {name: closed.count(name) for name in set(closed)},
        "failed": len(failures),
        "first_failures": failures[:5],
        "stuck_rows": health["running"],
        "stuck_queue": health["waiting"],
        "rss_mib_first": rss[0][1],
        "rss_mib_after_warmup": settled[0],
        "rss_mib_last": rss[-1][1],
        "rss_mib_max": max(m for _, m in rss),
        "rss_mib_idle": idle_rss,
        "rss_growth_after_warmup_mib": round(settled[-1] - settled[0], 1),
        "rss_samples": rss,
    }


def fuzz(url: str, examples: int) -> dict:
    """schemathesis over the served schema; the model name is set right so requests reach generation."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: dict[str, int] = {}
    server_errors: list[str] = []

    def fuzz_operation(operation) -> None:
        @settings(
            max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=operation.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "bench"
            response = case.call(base_url=url, timeout=120)
            key = f"{operation.method.upper()} {operation.path} {response.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
            if response.status_code >= 500:
                server_errors.append(f"{key}: {str(case.body)[:200]}")

        check()

    for result in schema.get_all_operations():
        fuzz_operation(result.ok())
    return {
        "requests": sum(statuses.values()),
        "5xx": len(server_errors),
        "statuses": statuses,
        "first_5xx": server_errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint directory to serve")
    parser.add_argument("--make-model", type=Path, help="write the ~150M random checkpoint here and serve it")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels of the sweep")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each sweep request")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--max-queue", type=int, default=128, help="the server's queue bound")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="positions per cache row")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--soak-seconds", type=float, default=120, help="0 skips the soak")
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument(
        "--soak-rounds",
        type=int,
        default=1,
        help="soaks in a row against the same server (a new seed each): RSS at the end of each tells a leak, "
        "which grows every round, from a peak, which is reached once",
    )
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20, help="the server's body limit")
    parser.add_argument("--fuzz", action="store_true", help="run schemathesis over the served schema")
    parser.add_argument("--fuzz-examples", type=int, default=50, help="examples per route")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if args.make_model is not None:
        args.model = make_model(args.make_model)
    if args.model is None:
        parser.error("give --model DIR or --make-model DIR")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    results: dict = {"model": str(args.model), "max_batch": args.max_batch, "threads": args.threads}
    try:
        results["load_average_before"] = os.getloadavg()
        asyncio.run(sweep_level(url, 1, 1, 8))  # warm-up
        sweep = []
        for clients in [int(c) for c in args.clients.split(",")]:
            level = asyncio.run(sweep_level(url, clients, args.requests, args.max_tokens))
            level["vs_1_client"] = (
                round(level["tokens_per_s"] / sweep[0]["tokens_per_s"], 2) if sweep else 1.0
            )
            sweep.append(level)
            print(json.dumps(level), flush=True)
        results["sweep"] = sweep
        if args.soak_seconds > 0:
            rounds = []
            for seed in range(args.soak_rounds):
                soaked = soak(
                    url, server.pid, args.soak_clients, args.soak_seconds, args.max_request_bytes, seed
                )
                rounds.append(asyncio.run(soaked))
                print(json.dumps({k: v for k, v in rounds[-1].items() if k != "rss_samples"}), flush=True)
            results["soak"], results["soak_rounds"] = rounds[0], rounds
        if args.fuzz:
            results["fuzz"] = fuzz(url, args.fuzz_examples)
            print(json.dumps(results["fuzz"]), flush=True)
        results["load_average_after"] = os.getloadavg()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    print("\nclients  tokens/s  vs 1  TTFT p50  TTFT p99")
    for level in results["sweep"]:
        print(
            f"{level['clients']:>7}  {level['tokens_per_s']:>8.1f}  {level['vs_1_client']:>4.1f}x"
            f"  {level['ttft_p50_s']:>7.3f}s  {level['ttft_p99_s']:>7.3f}s"
        )
    if "soak" in results:
        s = results["soak"]
        print(
            f"soak: {s['clients']} clients, {s['seconds']} s: {s['requests']} requests, {s['by_status']}, "
            f"{s['failed']} failed; RSS {s['rss_mib_after_warmup']} -> {s['rss_mib_last']} MiB after warm-up "
            f"(max {s['rss_mib_max']}), {s['rss_mib_idle']} MiB idle; stuck rows {s['stuck_rows']}, queue {s['stuck_queue']}"
        )
    if len(results.get("soak_rounds", [])) > 1:
        ends = ", ".join(f"{r['rss_mib_last']}" for r in results["soak_rounds"])
        idles = ", ".join(f"{r['rss_mib_idle']}" for r in results["soak_rounds"])
        fives = sum(r["by_status"]["5xx"] for r in results["soak_rounds"])
        stuck = sum(r["stuck_rows"] + r["stuck_queue"] for r in results["soak_rounds"])
        print(
            f"soak rounds: RSS at the end of each: {ends} MiB; 3 s later, idle: {idles} MiB; 5xx {fives}; stuck rows/queue {stuck}"
        )
    if "fuzz" in results:
        print(f"fuzz: {results['fuzz']['requests']} requests, {results['fuzz']['5xx']} with a 5xx status")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
