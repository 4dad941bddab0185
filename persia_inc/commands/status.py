"""`persia-inc status`: how far behind storage the embedding servers are, per stream."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persia_inc.loader.reports import LoaderReport

HELP = "per (table, producer): the servers' watermark, the newest stored packet, the lag, flags"
DESCRIPTION = """\
For each (table, producer) of the model: the watermark every shard holds, the newest packet in
storage, the lag in packets and seconds (how long the oldest packet the servers miss has been
stored), and flags for what must not go unseen:

  quarantined=N              N packets failed verification or were refused by the servers
  gap-passed=N               N times a missing packet was waited for and passed
  generation-jump-passed=N   N generation jumps were passed after the gap timeout
  skipped-below-watermark=N  N packets arrived after the watermark leapt past them (a passed
                             gap or generation jump): never applied
  generation-jump-held       the loader holds a packet whose generation is more than one above
                             the producer's highest known generation
  generation-jump=G:S        the next stored packet is such a jump (from storage)
  shard-unreachable=I,...    shards that do not answer (here, or to the loader)

The first four come from the loader and stay until an operator clears them (a later clean
apply does not repair the rows they concern): --clear TABLE/PRODUCER (repeatable) or --clear
all asks the loader to clear them, then shows the status (with the embedding servers' write
token from persia_inc.embedding_server.token_env, which the loader then asks for). Also
flagged: a loader that does not answer (loader-unreachable) and packets of other models under
incremental_dir.

Dense versions (when the loader's dense sync runs, from its /streams endpoint): the version
TorchServe serves by default, when it was exported and activated, and every pending version
with what it waits for (the shards' watermarks below its sparse positions, a pin), refused
ones with the reason, the rollback's pin (flag pinned=N), and whether TorchServe answers (flag
torchserve-unreachable: the exit status is then 1).

The loader's flags are read from its /streams endpoint (--loader, default the metrics address
and port of persia_inc.loader when metrics_port is set; 'none': do not ask). A shard that does
not answer is a flag, not a failure, as long as one answers. --json prints one JSON object.

Replicas (a shard listed as several addresses): one line per replica, up or down, serving or
catching up, its position per stream and its lag behind the freshest replica of its shard, and
whether the loader is catching it up from storage (with the packets applied so far). A
shard listed as replicas with no current one (every replica down or catching up) is flagged.

Exit status: 0 all well, 3 something is flagged (a stream's flag, an unreachable loader, other
models' packets, a shard with no current replica), 1 failed (no embedding server answers,
storage unreadable, a --clear the loader did not take; the reason is on stderr), 2 usage or
configuration error.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FLAGGED = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--loader", metavar="URL", default=None,
                        help="the loader's metrics endpoint, e.g. http://10.0.0.5:9100 (default: "
                             "persia_inc.loader.metrics_addr:metrics_port when set; 'none': skip)")
    parser.add_argument("--clear", metavar="TABLE/PRODUCER", action="append", default=[],
                        help="clear a stream's anomaly flags in the loader first ('all': every "
                             "stream); repeatable")


def _fmt(position: tuple[int, int] | None) -> str:
    return "-" if position is None else f"{position[0]}:{position[1]}"


def loader_report(url: str, timeout_s: float = 3.0) -> tuple[LoaderReport | None, str]:
    """The loader's /streams report at `url`, or None and why not."""
    import urllib.error
    import urllib.request

    from persia_inc.loader.reports import LoaderReport

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/streams", timeout=timeout_s) as reply:
            return LoaderReport.from_json(json.load(reply)), ""
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        return None, str(getattr(exc, "reason", exc))


def dense_unreachable(dense: dict[str, Any] | None) -> bool:
    """Whether the loader's dense sync flags TorchServe as not answering."""
    return dense is not None and "torchserve-unreachable" in dense.get("flags", [])


def dense_lines(dense: dict[str, Any]) -> list[str]:
    """The dense-version lines of the text report, from the loader's `dense` status."""
    active, torchserve, pinned = dense.get("active"), dense.get("torchserve") or {}, dense.get("pinned")
    lines = [f"dense model {dense.get('model_name')}: active version "
             + ("none" if not active else f"{active['version']} (exported_at_ns "
                f"{active['exported_at_ns']}, activated_at_ns {active['activated_at_ns']})")
             + (f", pinned by a rollback to version {pinned['version']} (`persia-inc rollback --unpin` "
                "releases it)" if pinned else "")
             + f"  flags {' '.join(dense.get('flags', [])) or '-'}"]
    if torchserve and not torchserve.get("answers", True):
        lines.append(f"  TorchServe at {torchserve.get('address')} does not answer: "
                     f"{torchserve.get('error')}; the active version is the last one it confirmed")
    for pending in dense.get("pending", []):
        waiting = "; ".join(pending.get("waiting_for", [])) or "-"
        lines.append(f"  pending version {pending['version']} ({pending['state']}): waiting for {waiting}")
    for refused in dense.get("refused", []):
        lines.append(f"  refused version {refused['version']}: {refused['reason']}")
    return lines


def replica_rows(client: Any) -> list[dict[str, Any]]:
    """Per target (every replica of every shard): up, current (serving), positions, and
    the streams where it holds less than the freshest replica of its shard."""
    from persia_inc.embedding_server.errors import ShardError

    rows: list[dict[str, Any]] = []
    for t in client.targets:
        row: dict[str, Any] = {"shard": t.shard, "replica": t.replica, "address": t.address,
                               "up": False, "current": False, "behind_s": 0.0, "positions": {},
                               "lagging": []}
        try:
            client.verify((t.index,))
            status = client.status(t.index)
        except ShardError as exc:
            row["error"] = str(exc)
        else:
            row.update(up=status.ready, current=status.ready and (status.current
                                                                  or not status.num_replicas),
                       behind_s=round(status.behind_s, 3),
                       positions={f"{w.table}/{w.producer}": [w.generation, w.sequence]
                                  for w in status.watermarks})
        rows.append(row)
    for row in rows:
        siblings = [r for r in rows if r["shard"] == row["shard"]]
        freshest: dict[str, list[int]] = {}
        for r in siblings:
            for stream, position in r["positions"].items():
                freshest[stream] = max(freshest.get(stream, position), position)
        row["lagging"] = sorted(s for s, p in freshest.items()
                                if row["positions"].get(s, [-1, -1]) < p)
    return rows


def clear_flags(url: str, chosen: list[str], token: str = "", timeout_s: float = 5.0) -> list[str]:
    """Ask the loader at `url` to clear the anomaly flags of `chosen` ("table/producer", or
    "all"), with the write `token` if any; returns the streams it cleared. Raises OSError (or
    ValueError) naming why not."""
    import urllib.error
    import urllib.request

    body = json.dumps({"streams": "all" if "all" in chosen else chosen}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/clear", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return [str(s) for s in json.load(reply)["cleared"]]
    except urllib.error.HTTPError as exc:
        raise ValueError(f"the loader at {url} refused --clear: {exc.read().decode(errors='replace')}"
                         ) from exc


def run(args: argparse.Namespace) -> int:
    from persia_inc.config import load_config
    from persia_inc.embedding_server.errors import ShardError
    from persia_inc.loader.sources import find_other_models
    from persia_inc.loader.stream_status import stream_status
    from persia_inc.packet_format import PacketError
    from persia_inc.storage import StorageError
    from persia_inc.wiring import embedding_client

    bad = [c for c in args.clear if c != "all" and (c.count("/") != 1 or "" in c.split("/"))]
    if bad:
        print(f"persia-inc status: --clear takes TABLE/PRODUCER or all, not {bad[0]!r}",
              file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config, need_servers=True)
    settings = config.persia_inc.loader
    url = args.loader
    if url is None and settings.metrics_port:
        url = f"http://{settings.metrics_addr}:{settings.metrics_port}"
    asked = url not in (None, "none")
    if args.clear:
        if not asked:
            print("persia-inc status: --clear needs the loader's metrics endpoint (--loader URL, "
                  "or persia_inc.loader.metrics_port)", file=sys.stderr)
            return EXIT_USAGE
        try:
            cleared = clear_flags(str(url), args.clear, config.persia_inc.embedding_server.write_token())
        except (OSError, ValueError, KeyError) as exc:
            print(f"persia-inc status: --clear: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            return EXIT_FAILED
        print(f"persia-inc status: cleared the flags of {', '.join(cleared) or 'no stream'}",
              file=sys.stderr)
    report, why = loader_report(str(url)) if asked else (None, "")
    loader_flag = f"loader-unreachable ({url}: {why})" if asked and report is None else ""
    try:
        with embedding_client(config) as client, config.open_store() as store:
            rows = stream_status(client, store, config.persia_inc.model, loader=report,
                                 limits=config.persia_inc.limits)
            others = find_other_models(store, config.persia_inc.model,
                                       (settings.quarantine_prefix.strip("/").partition("/")[0],))
            where = store.location("")
            replicas = replica_rows(client)
    except (ShardError, StorageError, PacketError, FileNotFoundError, PermissionError,
            RuntimeError) as exc:
        print(f"persia-inc status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if report is not None:  # the loader's catch-ups from storage, by replica
        catch_ups = {(sh.shard, sh.replica): sh for sh in report.shards}
        for rep in replicas:
            sh = catch_ups.get((rep["shard"], rep["replica"]))
            rep["catch_up"] = {"running": sh is not None and sh.catch_up,
                               "packets": 0 if sh is None else sh.catch_up_packets}
    dense = None if report is None else report.dense
    flags = [f"{r.table}/{r.producer}: {' '.join(r.flags)}" for r in rows if r.flags]
    flags += [loader_flag] if loader_flag else []
    flags += [f"other-models: {', '.join(others)}"] if others else []
    no_replica = _shards_without_current_replica(replicas)
    flags += [f"no-current-replica: shard {', '.join(map(str, no_replica))}"] if no_replica else []
    code = EXIT_FLAGGED if flags else EXIT_OK
    if no_replica:
        print(f"persia-inc status: shard(s) {', '.join(map(str, no_replica))} have no current "
              "replica (down or catching up)", file=sys.stderr)
    if dense is not None and dense_unreachable(dense):  # the dense sync's own rule: a failure
        print(f"persia-inc status: TorchServe at {dense['torchserve']['address']} does not answer",
              file=sys.stderr)
        code = EXIT_FAILED
    if args.json:
        print(json.dumps({
            "model": config.persia_inc.model,
            "other_models": others,
            "loader": None if not asked else {"url": url, "answered": report is not None,
                                              "error": why},
            "flags": flags,
            "streams": [
                {"table": r.table, "producer": r.producer,
                 "watermark": list(r.watermark) if r.watermark else None,
                 "newest": list(r.newest) if r.newest else None,
                 "lag_packets": r.lag_packets, "lag_s": round(r.lag_s, 3),
                 "flags": r.flags,
                 "anomalies": [] if r.loader is None else [a.to_json() for a in r.loader.anomalies],
                 "skipped_below_watermark": r.skipped_below_watermark,
                 "generation_jump_held": r.generation_jump_held,
                 "generation_jump": list(r.generation_jump) if r.generation_jump else None,
                 "shards_unreachable": list(r.shards_unreachable)} for r in rows],
            "dense": dense,
            "replicas": replicas}))
        return code
    if loader_flag:
        print(f"flag {loader_flag}: the loader's own flags are not shown")
    print(f"{'table':<20} {'producer':<20} {'servers':>16} {'storage':>16} {'lag':>6} {'lag_s':>9}"
          "  flags")
    for r in rows:
        print(f"{r.table:<20} {r.producer:<20} {_fmt(r.watermark):>16} {_fmt(r.newest):>16} "
              f"{r.lag_packets:>6} {r.lag_s:>9.1f}  {' '.join(r.flags) or '-'}")
    if dense is not None:
        for line in dense_lines(dense):
            print(line)
    if others:
        print(f"flag other-models: packets under {where} of other models than this config's "
              f"model {config.persia_inc.model!r}: {', '.join(others)}")
    if len(replicas) > len({x["shard"] for x in replicas}) or not all(x["current"] for x in replicas):
        for rep in replicas:
            state = ("down" if not rep["up"] else "serving" if rep["current"]
                     else f"catching up ({rep['behind_s']:.1f} s)")
            if rep.get("catch_up", {}).get("running"):
                state += f", loader catching it up from storage ({rep['catch_up']['packets']} packets)"
            lag = f"behind on {', '.join(rep['lagging'])}" if rep["lagging"] else "up to date"
            print(f"shard {rep['shard']} replica {rep['replica']} {rep['address']}: {state}, {lag}")
    return code


def _shards_without_current_replica(replicas: list[dict[str, Any]]) -> list[int]:
    """Shards listed as several replicas with no current one. A shard of one address that does
    not answer is the `shard-unreachable` flag of its streams instead."""
    counts: dict[int, int] = {}
    for r in replicas:
        counts[r["shard"]] = counts.get(r["shard"], 0) + 1
    shards = {shard for shard, count in counts.items() if count > 1}
    serving = {r["shard"] for r in replicas if r["current"]}
    return sorted(shards - serving)
