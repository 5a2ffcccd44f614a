"""The user endpoint's process: read the boot document, connect to the router, run tasks, idle out.

It connects to the manager's router over its ipc socket with the CURVE key
pair it was given on stdin, which is how the router knows which endpoint
every message comes from. Results are kept until the router acknowledges
them, and sent again if the acknowledgement does not come.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
from typing import Any

import msgspec
import zmq
from setproctitle import setproctitle

from mep.config.endpoint import UserEndpointConfig
from mep.endpoint.engine import ProcessEngine
from mep.endpoint.worker import Outcome
from mep.errors import MepError
from mep.protocol import decode, encode
from mep.protocol.curve import make_curve_client
from mep.protocol.messages import EndpointBoot, IdleExit, Ready, Result, Results, ResultsAck, Shutdown, Tasks

log = logging.getLogger("mep.endpoint")

RESEND_AFTER = 10.0


class UserEndpoint:
    def __init__(self, boot: EndpointBoot, config: UserEndpointConfig) -> None:
        self.boot = boot
        self.config = config
        self._completions: queue.SimpleQueue[tuple[str, Outcome]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        # The engine first: its forkserver must not inherit the ZeroMQ context or the keys.
        self.engine = ProcessEngine(config.engine.workers, self._task_done)
        self.functions: dict[str, bytes] = {}
        self.unacknowledged: dict[str, tuple[Result, bytes, float]] = {}
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 1000
        make_curve_client(self.socket, boot.router_public_key, boot.secret_key)
        self.socket.connect(boot.router_address)
        self._stop_reason = ""

    def _task_done(self, task_id: str, outcome: Outcome) -> None:  # any thread
        self._completions.put((task_id, outcome))
        os.write(self._wake_write, b"d")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop("SIGTERM"))
        self.socket.send_multipart(encode(Ready(endpoint_id=self.boot.endpoint_id, pid=os.getpid())))
        log.info("endpoint %s ready as %s with %d worker(s)", self.boot.endpoint_id, self.boot.account,
                 self.config.engine.workers)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        last_activity = time.monotonic()
        asked_to_exit = False
        while not self._stop_reason:
            ready = dict(poller.poll(500))
            if self._wake_read in ready:
                os.read(self._wake_read, 65536)
            while self.socket.poll(0):
                self._receive(self.socket.recv_multipart(copy=False))
                last_activity = time.monotonic()
            self._send_completions()
            now = time.monotonic()
            if self.engine.running or self.unacknowledged:
                last_activity = now
                asked_to_exit = False
            self._resend_unacknowledged(now)
            if not asked_to_exit and now - last_activity > self.config.idle_timeout:
                log.info("idle for %.0f s; asking the manager to let this endpoint exit", now - last_activity)
                self.socket.send_multipart(encode(IdleExit()))
                asked_to_exit = True
        log.info("endpoint stopping: %s", self._stop_reason)
        self.engine.shutdown()
        self._send_completions()
        self.socket.close()
        self.context.term()
        return 0

    def _request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        os.write(self._wake_write, b"x")

    def _receive(self, frames: list[Any]) -> None:
        try:
            header, payloads = decode(frames)
        except MepError as exc:
            log.warning("ignoring a malformed message from the router: %s", exc)
            return
        match header:
            case Tasks():
                for task in header.tasks:
                    if task.fn_frame != -1:
                        self.functions[task.fn_hash] = payloads[task.fn_frame].bytes
                    self.engine.submit(task.task_id, task.fn_hash, self.functions[task.fn_hash],
                                       payloads[task.args_frame].bytes)
            case ResultsAck():
                for task_id in header.task_ids:
                    self.unacknowledged.pop(task_id, None)
            case Shutdown():
                self._request_stop(header.reason or "the manager asked this endpoint to stop")
            case _:
                log.warning("ignoring an unexpected %s message", type(header).__name__)

    def _send_completions(self) -> None:
        finished: list[tuple[Result, bytes]] = []
        while True:
            try:
                task_id, outcome = self._completions.get_nowait()
            except queue.Empty:
                break
            self.engine.task_finished()
            result = Result(task_id=task_id, status=outcome.status, code=outcome.code, message=outcome.message,
                            error_type=outcome.error_type, traceback=outcome.traceback)
            finished.append((result, outcome.payload))
        self._send_results(finished)

    def _resend_unacknowledged(self, now: float) -> None:
        self._send_results([(result, payload) for result, payload, sent in self.unacknowledged.values()
                            if now - sent > RESEND_AFTER])

    def _send_results(self, items: list[tuple[Result, bytes]]) -> None:
        """Send results (again), remembering them until the router acknowledges them."""
        if not items:
            return
        now = time.monotonic()
        payloads: list[bytes] = []
        for result, payload in items:
            result.payload_frame = -1
            if payload:
                result.payload_frame = len(payloads)
                payloads.append(payload)
            self.unacknowledged[result.task_id] = (result, payload, now)
        self.socket.send_multipart(encode(Results(results=[result for result, _ in items]), payloads), copy=False)


def _release_boot_pipe() -> None:
    """Put /dev/null on stdin: the spawner's pipe has done its job and workers must not inherit it."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        boot = msgspec.json.decode(sys.stdin.buffer.read(), type=EndpointBoot)
    except msgspec.MsgspecError as exc:
        log.error("unusable boot document on stdin: %s", exc)
        return 2
    _release_boot_pipe()
    setproctitle(f"mep-endpoint {boot.account} {boot.endpoint_id}")
    config = UserEndpointConfig.model_validate(boot.config)
    return UserEndpoint(boot, config).run()
