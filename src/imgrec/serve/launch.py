"""Starting the server process: the checks before uvicorn starts (the port is free, a public
address has a key), the connection limit (from the file-descriptor limit, so /healthz keeps
answering), and a SIGTERM stop that exits 0. `imgrec serve` calls these; nothing here imports
torch."""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

from ..bundle import META_FILE, ONNX_FILE, ONNX_INT8_FILE, WEIGHTS_FILE
from ..errors import InputError
from .config import CONFIG_ENV, ServeConfig

#: file descriptors kept back from the connection limit (model files, pipes, the listener)
FD_MARGIN = 128
#: the soft file-descriptor limit asked for (a connection is a descriptor)
FD_WANTED = 65536


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, port: int, config: ServeConfig) -> str | None:
    """The one warning line for a server reachable from other machines without a key."""
    if config.api_keys or is_loopback(host):
        return None
    return (f"imgrec: warning: listening on {host}:{port} without an API key: anyone who can "
            "reach this port can use the model (set --api-key, $IMGREC_API_KEY or "
            "--api-key-file)")


def page_url(host: str, port: int, path: str = "/") -> str:
    """The address a banner shows: localhost for the loopback and wildcard addresses, an
    IPv6 address in brackets; port 0 is "a free port", which only uvicorn's log names."""
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "localhost") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}{path}" if port else \
        f"http://{shown}:<a free port, named below>{path}"


def check_port(host: str, port: int) -> None:
    """Fail in one line, before uvicorn starts, when the address cannot be listened on."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise InputError(f"cannot listen on {host!r}: no such host",
                         "give an address of this machine with --host (127.0.0.1, 0.0.0.0)") \
            from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise _bind_error(e, host, port) from None


def _bind_error(e: OSError, host: str, port: int) -> InputError:
    if e.errno == errno.EADDRINUSE:
        return InputError(f"port {port} is in use (something already listens on "
                          f"{host}:{port})", "stop it, or choose another port with --port")
    if e.errno == errno.EACCES:
        return InputError(f"port {port} needs privileges this user lacks",
                          "choose a port above 1023 with --port")
    if e.errno == errno.EADDRNOTAVAIL:
        return InputError(f"cannot listen on {host}: it is no address of this machine",
                          "use --host 127.0.0.1 or --host 0.0.0.0")
    return InputError(f"cannot listen on {host}:{port} ({e.strerror or e})")


def raise_fd_limit(wanted: int = FD_WANTED) -> int:
    """Raise this process's soft limit on open files towards `wanted` (never above the hard
    limit); the limit now in force."""
    try:
        import resource
    except ImportError:  # not Unix
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def connection_limit(config: ServeConfig, fd_limit: int) -> int:
    """uvicorn's limit_concurrency per worker: --max-connections, else what the descriptors
    allow. Past it uvicorn answers its own plain-text 503; below it every connection, /healthz
    included, is served, so the limit sits under the descriptor limit (where accept() itself
    would fail and the server stop answering)."""
    return config.max_connections or max(64, fd_limit - FD_MARGIN)


def run_server(config: ServeConfig, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn on the app factory, the config passed in the environment (workers share a
    Prometheus folder). SIGTERM stops it gracefully (no new connections, the requests in
    flight answered, the micro-batcher drained) and the process then exits 0 instead of dying
    of the signal uvicorn re-raises."""
    import uvicorn

    snapshot = pinned_bundle(config) if config.workers > 1 else None
    if snapshot is not None:
        config = replace(config, model=str(snapshot))
    os.environ[CONFIG_ENV] = config.to_env()
    shared = None
    if config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shared = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
            prefix="imgrec-metrics-")
    limit = connection_limit(config, raise_fd_limit())
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises it to us
    try:
        uvicorn.run("imgrec.serve.app:create_app_from_env", factory=True, host=host, port=port,
                    workers=config.workers, log_level=log_level, timeout_graceful_shutdown=30,
                    limit_concurrency=limit, timeout_keep_alive=5, server_header=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if shared:  # (a process that goes on, as a test's, must not point at a removed folder)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for folder in (shared, snapshot and snapshot.parent):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


#: what a worker reads of a bundle (the weights only where there is no ONNX file to serve)
SERVED_FILES = (META_FILE, ONNX_FILE, ONNX_INT8_FILE)


def pinned_bundle(config: ServeConfig) -> Path:
    """The served bundle's files as they are now, in a folder of their own (hard links where
    the file system allows: a retraining renames new files into the bundle and leaves these),
    for the workers to load: a worker restarted after the bundle was retrained served the
    new model beside the others' old one."""
    from ..zoo import open_bundle

    source = open_bundle(config.model, need_weights=False).path
    folder = Path(tempfile.mkdtemp(prefix="imgrec-served-")) / source.name
    folder.mkdir()
    names = SERVED_FILES if (source / ONNX_FILE).is_file() or (source / ONNX_INT8_FILE).is_file() \
        else (*SERVED_FILES, WEIGHTS_FILE)
    for name in names:
        if (source / name).is_file():
            try:
                os.link(source / name, folder / name)
            except OSError:  # another file system, or no hard links: a copy
                shutil.copy2(source / name, folder / name)
    return folder
