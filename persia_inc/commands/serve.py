"""`persia-inc serve --config CFG --model-store DIR --model NAME.mar`: TorchServe for one model."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from persia_inc.serving import ServedModel, ServeError, ServeSettings

if TYPE_CHECKING:
    pass

HELP = ("serve a .mar with TorchServe (or --frontend kserve: the Open Inference Protocol) on 127.0.0.1, "
        "reaching the configured embedding servers")
DESCRIPTION = """\
Starts TorchServe (persia_inc.inference.local.LocalTorchServe) with our settings, registers
DIR/NAME.mar, waits until its worker is ready, prints where it serves, and runs until SIGTERM
or Ctrl-C; then it stops TorchServe (and its workers) and exits 0.

Settings: every address is on 127.0.0.1 (put a proxy in front to serve other hosts); the
model API is on; token authorization is off (TorchServe 0.12 turns it on by default). The
handler inside the .mar (persia_inc.handler.ConfiguredHandler) reads the embedding servers
from CFG, passed to TorchServe as PERSIA_INC_CONFIG, so one .mar serves any deployment.

Ports are TorchServe's defaults (gRPC inference 7070, management 7071; HTTP inference 8080,
management 8081, metrics 8082); 0 takes a free port. Clients of a non-default gRPC port set
PERSIA_INC_INFERENCE_ADDRESS=127.0.0.1:PORT (printed at start) for get_inference_stub().

Token authorization: --token-auth turns it on. TorchServe then writes its keys to
WORKDIR/key_file.json ("management", "inference" and "API" keys); clients send
"Authorization: Bearer KEY" (HTTP header, or gRPC metadata "authorization"). The command
registers the model with the management key itself.

Needs TorchServe (pip install 'persia-inc[serve]') and a Java 17 runtime (or JAVA_HOME).

--frontend kserve serves the same .mar over the Open Inference Protocol (KServe v2): REST on
--inference-port (default 8080) and gRPC on --grpc-inference-port (default 8081), in this
process, no Java (persia_inc.commands.serve_kserve; routes, tensors and the management
routes the dense sync uses are in persia_inc.inference.oip_http and persia_inc.inference.oip).
Its --token-auth reads the token from PERSIA_INC_SERVE_TOKEN; --tls-cert/--tls-key turn TLS
on for both transports; the other TorchServe options do not apply.

Exit status: 0 stopped cleanly, 1 TorchServe or Java missing, TorchServe failed to start,
the model failed to register or TorchServe died, 2 usage or configuration error.
"""

log = logging.getLogger(__name__)


# port options -> LocalTorchServe's port names (defaults: inference.local.DEFAULT_PORTS, resolved
# in run() so that --help imports nothing heavy)
PORT_OPTIONS = {"grpc_inference": "gRPC inference", "grpc_management": "gRPC management",
                "inference": "HTTP inference", "management": "HTTP management", "metrics": "HTTP metrics"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from persia_inc.commands import serve_kserve

    parser.add_argument("--frontend", choices=["torchserve", "kserve"], default="torchserve",
                        help="TorchServe (default) or the Open Inference Protocol, KServe v2 (below)")
    parser.add_argument("--config", metavar="CFG", required=True,
                        help="global_config.yaml naming the embedding servers (PersiaInferConfig.servers)")
    parser.add_argument("--model-store", metavar="DIR", required=True,
                        help="TorchServe's model store: the directory holding the .mar")
    parser.add_argument("--model", metavar="NAME.mar", required=True,
                        help="the .mar file in DIR to register (built by persia_inc.inference.archive)")
    parser.add_argument("--workdir", metavar="WORKDIR", default=None,
                        help="where config.properties, logs/ and key_file.json go (default: a new "
                             "directory under the system temp dir, printed at start and kept)")
    for name, what in PORT_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", dest=f"{name}_port", metavar="PORT",
                            type=int, default=None, help=f"{what} port (default: TorchServe's, above)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="workers of the model (default: 2: on two cores, with one torch "
                             "thread each, two workers answer more requests/s within a 50 ms "
                             "p99 than one; bench/results/inference.json, 'throughput')")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="TorchServe batch size (default: 1; above 1, a bad request that shares "
                             "a batch with good ones is answered HTTP 400, but over gRPC an OK with an "
                             "error body: TorchServe 0.12's gRPC front end drops per-request statuses)")
    parser.add_argument("--max-batch-delay-ms", type=int, default=5, metavar="MS",
                        help="how long TorchServe waits to fill a batch (default: 5)")
    parser.add_argument("--start-timeout-s", type=float, default=120.0, metavar="S",
                        help="how long TorchServe and the model's workers get to come up (default: 120)")
    parser.add_argument("--token-auth", action="store_true",
                        help="turn TorchServe's token authorization on (keys in WORKDIR/key_file.json)")
    serve_kserve.add_arguments(parser)


def _layout(mar: Path) -> str:
    """What the .mar's model spec serves, in a few words; ValueError (naming the spec's key)
    if the spec is missing or malformed, so that fails here and not in a worker."""
    from persia_inc.inference.spec import SPEC_FILE, ModelSpec

    try:
        with zipfile.ZipFile(mar) as archive:
            text = archive.read(SPEC_FILE).decode("utf-8")
    except (OSError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{mar} has no readable {SPEC_FILE} (build it with "
                         f"persia_inc.inference.archive): {exc}") from exc
    spec = ModelSpec.from_json(text, f"{mar.name}:{SPEC_FILE}")
    dims = sorted(set(spec.dims))
    return (f"{len(spec.sparse)} sparse features in {len(spec.tables)} table(s), dim "
            f"{'/'.join(map(str, dims))}, {spec.dense_dim} dense")


def _checked_model(args: argparse.Namespace) -> int:
    """0 if --config loads and --model names a .mar in --model-store, else the exit status."""
    from persia_inc.config import load_config

    load_config(Path(args.config), need_servers=True)  # ConfigError: exit 2 with the key named
    mar = Path(args.model_store) / args.model
    if Path(args.model).name != args.model or mar.suffix != ".mar":
        return _fail(f"--model takes a .mar file name in --model-store, got {args.model!r}", 2)
    if not mar.is_file():
        return _fail(f"no {args.model} in {Path(args.model_store).resolve()}", 2)
    return 0


def _fail(message: str, code: int = 1) -> int:
    print(f"persia-inc serve: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    import signal
    import tempfile
    import time

    from persia_inc.config import load_config
    from persia_inc.inference.client import ADDRESS_ENV, DEFAULT_ADDRESS
    from persia_inc.inference.local import (
        DEFAULT_PORTS,
        StartCancelledError,
        TorchServeError,
        TorchServeMissingError,
        check_installed,
    )

    if args.frontend == "kserve":
        from persia_inc.commands import serve_kserve

        return _checked_model(args) or serve_kserve.run(args)
    try:
        check_installed()
    except TorchServeMissingError as exc:
        return _fail(str(exc))
    config_path = Path(args.config).resolve()
    load_config(config_path, need_servers=True)  # ConfigError: exit 2 with the key named
    store = Path(args.model_store).resolve()
    mar = store / args.model
    if Path(args.model).name != args.model or mar.suffix != ".mar":
        return _fail(f"--model takes a .mar file name in --model-store, got {args.model!r}", 2)
    if not mar.is_file():
        return _fail(f"no {args.model} in {store}", 2)
    try:
        layout = _layout(mar)
        settings = ServeSettings(
            workers=args.workers, batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms, start_timeout_s=args.start_timeout_s,
            token_auth=args.token_auth,
            ports={name: DEFAULT_PORTS[name] if getattr(args, f"{name}_port") is None
                   else getattr(args, f"{name}_port") for name in PORT_OPTIONS})
    except ValueError as exc:
        return _fail(str(exc), 2)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="persia-inc-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        served = ServedModel(config_path, mar, workdir, settings)
    except ValueError as exc:
        return _fail(str(exc), 2)
    server = served.server
    try:
        try:
            served.start(cancel=stop)
        except StartCancelledError:
            return 0
        except (TorchServeError, ServeError) as exc:
            log.debug("start failed", exc_info=True)
            return _fail(f"cannot serve {args.model}: {exc}\n{server.log_tail()}")
        if stop.is_set():
            return 0
        grpc_target = served.grpc_target
        token = (f"on, keys in {server.key_file}" if args.token_auth
                 else "off (--token-auth turns it on)")
        print(f"serving model {served.model_name!r} ({mar}: {layout}) with {args.workers} worker(s); "
              f"TorchServe pid {server.pid}, logs in {workdir / 'logs'}\n"
              f"  inference   gRPC {grpc_target}  HTTP {server.inference_url}\n"
              f"  management  gRPC {server.grpc_management_target}  HTTP {server.management_url}\n"
              f"  metrics     HTTP {server.metrics_url}\n"
              f"  token authorization: {token}\n"
              + (f"  clients: export {ADDRESS_ENV}={grpc_target}\n" if grpc_target != DEFAULT_ADDRESS
                 else "")
              + "stop with SIGTERM or Ctrl-C", flush=True)
        while not stop.wait(0.5):
            code = server.exit_code()
            if code is not None:
                return _fail(f"TorchServe exited with {code}:\n{server.log_tail()}")
        log.info("stopping TorchServe (pid %s)", server.pid)
        started = time.monotonic()
        served.close()
        log.info("TorchServe stopped in %.1f s", time.monotonic() - started)
        return 0
    finally:
        served.close()
