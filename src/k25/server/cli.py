"""`k25 serve`: the OpenAI-compatible API and the playground over a checkpoint directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def how_to_talk(name: str, url: str, api_key: str | None) -> str:
    """The banner `k25 serve` prints: the three ways in (browser, curl, the openai client)."""
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    key = api_key or "none"
    return f"""k25: serving {name} on {url}
  browser:  {url}/   (the playground)
  curl:     curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\
              -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  python:   from openai import OpenAI
            client = OpenAI(base_url="{url}/v1", api_key="{key}")
            client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hello"}}])
  Instant mode: add {{"thinking": {{"type": "disabled"}}}} to the request (extra_body= in the openai client)."""


def model_and_name(model: str | None, served_model_name: str | None) -> tuple[Path, str]:
    """The directory to serve and the id clients send: the shipped k25-mini (named ``k25-mini``) when
    no model is given, else the directory (named after its folder unless ``--served-model-name``)."""
    from ..weights import DEFAULT_MODEL_NAME, default_model_dir

    if model is None:
        return default_model_dir(), served_model_name or DEFAULT_MODEL_NAME
    directory = Path(model)
    return directory, served_model_name or directory.name


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .local import load_backend

    try:
        directory, name = model_and_name(args.model, args.served_model_name)
        backend = load_backend(directory, name, dtype=args.dtype, vision=args.vision, cache_tokens=args.cache_tokens,
                               max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                               max_model_len=args.max_model_len)
    except FileNotFoundError as e:  # no k25-mini weights, or a folder without its tokenizer
        raise SystemExit(f"k25 serve: {e}") from None
    api_key = args.api_key or os.environ.get("K25_API_KEY")
    app = create_app(backend, strict_kimi_api=args.strict_kimi_api, api_key=api_key,
                     allowed_local_media_path=args.allowed_local_media_path, tool_grammar=args.tool_grammar)
    print(how_to_talk(name, f"http://{args.host}:{args.port}", api_key), flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        backend.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint (default: k25-mini) behind the OpenAI-compatible "
                                            "API and the playground")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory (config.json, safetensors, tiktoken.model), e.g. a Kimi K2.5 download "
                        "(default: the built-in k25-mini)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the directory name; k25-mini for the built-in model)")
    p.add_argument("--strict-kimi-api", action="store_true",
                   help="reproduce the official platform's rules (fixed sampling values, reasoning_content checks)")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--cache-tokens", type=int, default=32768, help="latent KV cache size in tokens")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests generated together")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: the checkpoint's)")
    p.add_argument("--api-key", default=None, help="require this bearer key on /v1 (or set K25_API_KEY)")
    p.add_argument("--no-vision", dest="vision", action="store_false",
                   help="serve text only even if the checkpoint has a vision tower")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="let image_url/video_url name local files under this directory (default: data: URLs only)")
    p.add_argument("--no-tool-grammar", dest="tool_grammar", action="store_false",
                   help="let tool calls through unconstrained (default: once the model opens a tool call, it is "
                   "held to the declared tool names and argument schemas)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)
