"""Serving benchmarks: N concurrent streaming clients against `llmkit serve` over loopback, N = 1, 2, 4, ... 32.

Each level sends its requests (a fixed prompt, a fixed number of new tokens: `ignore_eos`) from N clients at once
and measures what users see: aggregate output tokens/s, time to first token (TTFT) and the inter-token latency
(ITL, the gaps between streamed pieces), as p50 and p95, and the errors. The server runs in its own process, as
it would in production, so the clients' Python does not share its interpreter. Results are JSON lines carrying
the command, the commit and the machine.
"""

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import torch

from llmkit.bench import environment
from llmkit.errors import LLMKitError
from llmkit.files import check_output_path
from llmkit.serve import ServerProcess

PROMPT = "The built-in function"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, list[float], int]:
    """Stream one completion: (time to first token, gaps between pieces, completion tokens)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise LLMKitError(f"status {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise LLMKitError("the stream carried no text")
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], tokens


async def load_level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` completions from `concurrency` clients at once (each client sends its next when one ends)."""
    todo = iter(range(requests))
    ttfts, gaps, errors, tokens = [], [], [], 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for _ in todo:
            try:
                ttft, itl, n = await one_request(client, url, max_tokens)
            except (httpx.HTTPError, LLMKitError) as e:
                errors.append(str(e))
                continue
            ttfts.append(ttft)
            gaps.extend(itl)
            tokens += n

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "errors": len(errors),
            "first_error": errors[0] if errors else None, "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "itl_p50_s": percentile(gaps, 50), "itl_p95_s": percentile(gaps, 95)}  # fmt: skip


def bench_serve(server_args: Sequence[str], concurrencies: Sequence[int] = (1, 2, 4, 8, 16, 32),
                max_tokens: int = 64, requests: int | None = None, out: str | Path | None = None, command: str = "",
                url: str | None = None, server_log: str | Path | None = None) -> list[dict]:  # fmt: skip
    """Measure each concurrency level against a server started with `server_args` (or the one at `url`).

    Each level sends `requests` requests (default: twice its concurrency, at least 8) after one warm-up request.
    Rows are appended to `out` as JSON lines when given; the server's own output (its compile progress) goes to
    `server_log` when given.
    """
    if any(c < 1 for c in concurrencies) or max_tokens < 1 or (requests is not None and requests < 1):
        raise LLMKitError("--concurrency, --max-tokens and --requests must be at least 1")
    if out:
        check_output_path(out, force=True)
    # compiling the decode step for every batch size takes minutes on a CPU before the server answers
    server = None if url else ServerProcess(server_args, timeout=900 if "--compile" in server_args else 120,
                                            log=server_log)  # fmt: skip
    url = url or server.url
    server_args = list(map(str, server_args))
    device = server_args[server_args.index("--device") + 1] if "--device" in server_args else "cpu"
    record = {"command": command, "server_args": server_args,  # environment() names the commit and the machine
              **environment(torch.device(device)), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    rows = []
    try:
        asyncio.run(load_level(url, 1, 1, max_tokens))  # warm-up: the first request pays for lazy set-up
        for c in concurrencies:
            row = {**asyncio.run(load_level(url, c, requests or max(8, 2 * c), max_tokens)), **record}
            rows.append(row)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        if server:
            server.stop()
    return rows


def table(rows: Sequence[dict]) -> str:
    """The rows as a text table; "x one" is the aggregate tokens/s over the first level's (one client)."""
    one = rows[0]["tokens_per_s"] if rows else 0
    lines = [f"{'clients':>7} {'tok/s':>8} {'x one':>6} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} errors"]
    for r in rows:
        lines.append(f"{r['concurrency']:>7} {r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / one:>6.2f} "
                     f"{r['ttft_p50_s'] * 1000:>7.0f}ms {r['ttft_p95_s'] * 1000:>5.0f}ms "
                     f"{r['itl_p50_s'] * 1000:>6.1f}ms {r['itl_p95_s'] * 1000:>5.1f}ms {r['errors']:>6}")  # fmt: skip
    return "\n".join(lines)
