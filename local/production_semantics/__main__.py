"""``python -m dagster_gcf_pipes.local.production_semantics --upstream HOST:PORT --port P --control-port C``:
the production-semantics layer in front of the Pub/Sub emulator at ``--upstream``, serving Pub/Sub on ``P``
and its control endpoint on ``C`` (both on 127.0.0.1). ``--settings '{"duplicate_rate": 0}'`` starts it with
other settings than the defaults. Stops on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import grpc

from dagster_gcf_pipes.local.production_semantics.behaviours import Behaviours
from dagster_gcf_pipes.local.production_semantics.control import serve_control
from dagster_gcf_pipes.local.production_semantics.proxy import CHANNEL_OPTIONS, Layer, Proxy

#: logged once both ports answer
READY = "production-semantics layer ready"


async def _run(upstream: str, port: int, control_port: int, settings: Behaviours) -> None:
    layer = Layer(upstream, settings)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((Proxy(layer),))
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    control = await serve_control(layer, control_port)
    logging.getLogger("dagster_gcf_pipes.local.production_semantics").info("%s: Pub/Sub on 127.0.0.1:%d (in front of %s), control on 127.0.0.1:%d; %s",
                                     READY, port, upstream, control_port, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    control.close()
    await server.stop(grace=1)
    await layer.channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the Pub/Sub emulator, HOST:PORT")
    parser.add_argument("--port", type=int, required=True, help="where to serve Pub/Sub")
    parser.add_argument("--control-port", type=int, required=True, help="where to serve the control endpoint")
    parser.add_argument("--settings", default="{}", help="JSON object of settings that differ from the defaults")
    args = parser.parse_args(argv)
    try:
        settings = Behaviours().updated(**json.loads(args.settings))
    except ValueError as exc:
        parser.error(f"--settings: {exc}")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_run(args.upstream, args.port, args.control_port, settings))


if __name__ == "__main__":
    main()
