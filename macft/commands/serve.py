"""`macft serve`: an OpenAI-compatible HTTP server for a base model and its adapters."""

from __future__ import annotations

import click

from macft.engines import ENGINES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", "model_spec", default=None, help="Hub id, model folder, .gguf file or gemma3-270m (default: the first adapter's base, else gemma3-270m).")
@click.option("--adapter", "-a", "adapters", multiple=True, help="NAME=RUN, a run directory (named after its folder), a folder of runs, or a PEFT adapter (folder or hub id); repeat for more.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; only this machine can connect to 127.0.0.1. 0.0.0.0 opens it to your network, without authentication.")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--engine", type=click.Choice(ENGINES), default="mlx", show_default=True, help="llama.cpp: the base's cached Q8_0 GGUF with LoRA adapters switched at runtime (LoRA only).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True, help="Answer length for requests that set no max_tokens.")
@click.option("--temperature", "-t", type=click.FloatRange(min=0.0, max=2.0), default=0.7, show_default=True, help="For requests that set none (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.95, show_default=True, help="For requests that set none.")
def serve(model_spec, adapters, host, port, engine, max_tokens, temperature, top_p):
    """Serve a base model and any number of its adapters over an OpenAI-compatible API:
    /v1/models, /v1/chat/completions and /v1/completions, streamed (server-sent events) or not.

    The request's "model" picks an adapter by its name, or the bare base by the id /v1/models
    lists; adapters are switched on the one loaded base. Chat messages use the model's chat template
    and stop tokens exactly as `macft chat`; requests are answered one at a time, in arrival order.
    It listens on 127.0.0.1 (this machine only) unless --host says otherwise.

    \b
    Examples:
      macft serve --adapter json=runs/json --adapter dates=runs/dates
      macft serve --model gemma3-270m --adapter runs/          # every run in runs/, named after its folder
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "json", "messages": [{"role": "user", "content": "Hi"}]}'

    \b
    From Python (pip install openai):
      client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
      client.chat.completions.create(model="json", messages=[{"role": "user", "content": "Hi"}])
    """
    import importlib.util
    import signal
    import sys

    from macft.backend import detect
    from macft.phases import phase
    from macft.serve import Defaults, make_server, open_served

    with phase("Loading the base model and adapters"):
        served = open_served(model_spec, list(adapters), engine)
        server = make_server(served, host, port, Defaults(max_tokens, temperature, top_p), log=lambda line: click.echo(line, err=True))
    if engine == "mlx" and importlib.util.find_spec("llama_cpp") and detect().device == "cpu":
        click.echo("note: MLX computes on this CPU; --engine llama.cpp decoded 3-40x faster in docs/benchmarks.md (LoRA adapters only).", err=True)
    names = ", ".join(served.adapters) or "none"
    click.echo(f"Serving {served.base} (adapters: {names}) with {engine} on {server.url}  (Ctrl-C stops)")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean stop under a process manager
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("Stopped.", err=True)
    finally:
        server.server_close()
