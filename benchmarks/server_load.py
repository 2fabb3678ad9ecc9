"""Load test: N concurrent streaming clients against `k25 serve`'s app on loopback.

Starts the server in-process on a free 127.0.0.1 port over a random checkpoint (byte tokenizer),
then runs, in one process and one run: (1) one client alone, (2) N clients at once, each asking
for `--tokens` tokens with `ignore_eos`. Reports aggregate generated tokens/s, the ratio of
concurrent to single-client throughput, time to first token percentiles, and errors. Bounded:
each client sends one request; everything stops at the end.

    python benchmarks/server_load.py --clients 32 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time

import openai
import torch

import k25
from k25.chat.tokenizer import KimiTokenizer
from k25.engine.engine import EngineConfig, LLMEngine
from k25.server.app import create_app
from k25.server.engine_backend import EngineBackend
from k25.testing import ServerThread, byte_tokenizer, tiny_config, write_random_checkpoint


async def one_client(client: openai.AsyncOpenAI, i: int, tokens: int) -> tuple[int, float, float]:
    """(tokens received, time to first token, total time) for one streaming request."""
    start = time.perf_counter()
    first = None
    n = 0
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": f"Client {i}: tell me something long."}],
        max_tokens=tokens, stream=True, stream_options={"include_usage": True}, temperature=1.0, seed=i,
        extra_body={"ignore_eos": True, "thinking": {"type": "disabled"}},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
        elif first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
    return n, first or 0.0, time.perf_counter() - start


async def run(url: str, clients: int, tokens: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, i, tokens) for i in range(clients)), return_exceptions=True)
    wall = time.perf_counter() - start
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    ttft = sorted(r[1] for r in ok)
    total = sum(r[0] for r in ok)
    await client.close()
    return {
        "clients": clients, "errors": len(errors), "tokens": total, "wall_s": wall, "tok_per_s": total / wall,
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden-size", type=int, default=64, help="width of the tiny model (vocab stays 512)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    work = tempfile.mkdtemp()
    cfg = tiny_config(text_only=True, hidden_size=args.hidden_size)
    write_random_checkpoint(work, cfg, seed=0, tokenizer=byte_tokenizer(work + "/tok"))
    tokenizer = KimiTokenizer.from_pretrained(work)
    model = k25.load(work, dtype=torch.float32, vision=False)
    engine = LLMEngine(model, EngineConfig(cache_tokens=65536, max_num_seqs=args.max_num_seqs), tokenizer=tokenizer)
    backend = EngineBackend(engine, tokenizer, "bench", max_waiting=10_000)
    with ServerThread(create_app(backend)) as srv:
        asyncio.run(run(srv.url, 1, 8))  # warm-up
        single = asyncio.run(run(srv.url, 1, args.tokens))
        many = asyncio.run(run(srv.url, args.clients, args.tokens))
    backend.close()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: tiny preset, hidden {args.hidden_size}, {sum(p.numel() for p in model.parameters()):,} params, fp32")
    for name, r in (("1 client", single), (f"{args.clients} clients", many)):
        print(f"{name:>11}: {r['tokens']} tokens in {r['wall_s']:.2f} s = {r['tok_per_s']:.1f} tok/s, "
              f"TTFT p50 {r['ttft_p50'] * 1000:.0f} ms p95 {r['ttft_p95'] * 1000:.0f} ms, errors {r['errors']}")
    ratio = many["tok_per_s"] / single["tok_per_s"]
    print(f"aggregate throughput ratio ({args.clients} clients / 1 client): {ratio:.1f}x")


if __name__ == "__main__":
    main()
