#!/usr/bin/env python3
"""A hostile HTTP/2 client (issue 11, item 1), used by tests/hostile_h2.rs.

Opens CONNS cleartext h2 connections (prior knowledge) to HOST:PORT, each
with STREAMS concurrent GETs of PATH, advertising a zero initial stream
window (SETTINGS_INITIAL_WINDOW_SIZE = 0) and never sending WINDOW_UPDATE,
so the server can send no DATA at all. Every PING_EVERY seconds it sends a
PING on every connection, as a client would to look alive. It runs for
HOLD seconds (or until every connection was closed by the server), then
prints one JSON line:

  {"opened": n, "accepted_streams": n, "headers": n, "refused": n,
   "closed_by_server": n, "closed_after": [seconds, ...],
   "max_concurrent_streams": n}

`accepted_streams` counts streams the server did not refuse; `headers`
those that got a response head; `closed_after` when the server closed each
connection (seconds since it was opened).

Usage: h2_flood.py HOST PORT PATH CONNS STREAMS HOLD [PING_EVERY]
"""

import json
import selectors
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes


def main():
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conns, streams, hold = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    ping_every = float(sys.argv[7]) if len(sys.argv) > 7 else 1.0

    sel = selectors.DefaultSelector()
    state = {}
    start = time.monotonic()
    for _ in range(conns):
        sock = socket.create_connection((host, port))
        sock.setblocking(False)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        c = h2.connection.H2Connection(config=cfg)
        c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            },
        )
        c.initiate_connection()
        s = {
            "sock": sock,
            "conn": c,
            "opened": time.monotonic(),
            "closed": None,
            "asked": 0,
            "headers": 0,
            "refused": 0,
            "max_streams": None,
        }
        state[sock.fileno()] = s
        sel.register(sock, selectors.EVENT_READ, s)
        flush(s)

    next_ping = time.monotonic() + ping_every
    deadline = start + hold
    while time.monotonic() < deadline:
        open_conns = [s for s in state.values() if s["closed"] is None]
        if not open_conns:
            break
        for s in open_conns:
            ask(s, path, streams)
        now = time.monotonic()
        if now >= next_ping:
            for s in open_conns:
                try:
                    s["conn"].ping(b"stowage!")
                except h2.exceptions.ProtocolError:
                    pass
                flush(s)
            next_ping = now + ping_every
        for key, _ in sel.select(timeout=max(0.0, min(next_ping, deadline) - time.monotonic())):
            s = key.data
            try:
                data = s["sock"].recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                close(s, sel)
                continue
            try:
                events = s["conn"].receive_data(data)
            except h2.exceptions.ProtocolError:
                close(s, sel)
                continue
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    s["headers"] += 1
                elif isinstance(ev, h2.events.StreamReset):
                    s["refused"] += 1
                elif isinstance(ev, h2.events.RemoteSettingsChanged):
                    mcs = ev.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
                    if mcs is not None:
                        s["max_streams"] = mcs.new_value
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    close(s, sel)
            flush(s)

    out = {
        "opened": conns,
        "accepted_streams": sum(s["asked"] - s["refused"] for s in state.values()),
        "headers": sum(s["headers"] for s in state.values()),
        "refused": sum(s["refused"] for s in state.values()),
        "closed_by_server": sum(1 for s in state.values() if s["closed"] is not None),
        "closed_after": sorted(
            round(s["closed"] - s["opened"], 2) for s in state.values() if s["closed"] is not None
        ),
        "max_concurrent_streams": max(
            (s["max_streams"] for s in state.values() if s["max_streams"] is not None),
            default=None,
        ),
    }
    print(json.dumps(out), flush=True)
    for s in state.values():
        try:
            s["sock"].close()
        except OSError:
            pass


def ask(s, path, streams):
    """Opens streams up to STREAMS, within the server's advertised limit."""
    c = s["conn"]
    while s["asked"] < streams:
        if c.open_outbound_streams >= c.remote_settings.max_concurrent_streams:
            break
        sid = c.get_next_available_stream_id()
        c.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "http"), (":authority", "stowage"), (":path", path)],
            end_stream=True,
        )
        s["asked"] += 1
    flush(s)


def flush(s):
    if s["closed"] is not None:
        return
    data = s["conn"].data_to_send()
    while data:
        try:
            n = s["sock"].send(data)
        except (BlockingIOError, InterruptedError):
            time.sleep(0.001)
            continue
        except OSError:
            s["closed"] = time.monotonic()
            return
        data = data[n:]


def close(s, sel):
    if s["closed"] is None:
        s["closed"] = time.monotonic()
    try:
        sel.unregister(s["sock"])
    except (KeyError, ValueError):
        pass


if __name__ == "__main__":
    main()
