"""A worker's membership in its front: register, then keep checking in, and register again when evicted.

The front evicts a worker that stays silent longer than its eviction time (a stalled process: a long GC
pause, swapping, SIGSTOP) and fails the requests it held. Such a worker runs on afterwards as if nothing
happened, so it has to find out by itself: every ``CheckIn`` quotes the lease of its registration, and a
front that no longer knows that lease (it evicted the worker, or it restarted) answers "not registered".
The worker then discards its state — the front has already written off everything it held — and
registers again with the same fingerprint, which puts it back into a slot without a new process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

import grpc

from jdisagg.v1 import worker_pb2 as wpb
from jdisagg.v1 import worker_pb2_grpc as wpb_grpc

log = logging.getLogger("jdisagg.worker")

CHECK_IN_S = 1.0  # how often a worker asks; also how long after a stall it takes to notice an eviction
_RETRY_S = 1.0  # between registration attempts after an eviction


class RegistrationRefused(Exception):
    """The front refused this worker (another fingerprint, no free slot) or did not answer."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class Membership:
    """One worker's registration with the front at ``join``."""

    def __init__(self, join: str, request: wpb.RegisterRequest) -> None:
        self._join, self._request = join, request
        self._channel = grpc.insecure_channel(join)
        self._control = wpb_grpc.ControlStub(self._channel)
        self.slot, self.lease = -1, 0

    def register(self, timeout_s: float = 30.0) -> int:
        """Take a slot; returns its index. Raises ``RegistrationRefused`` with the front's reason."""
        try:
            reply = self._control.Register(self._request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise RegistrationRefused(f"{exc.code().name}: {exc.details()}", exc.code()) from exc
        self.slot, self.lease = reply.slot, reply.lease
        return reply.slot

    def registered(self) -> bool | None:
        """Whether the front still counts this worker in its slot; None when the front does not answer."""
        request = wpb.CheckInRequest(role=self._request.role, slot=self.slot, lease=self.lease)
        try:
            return self._control.CheckIn(request, timeout=5.0).registered
        except (grpc.RpcError, ValueError):  # ValueError: the channel was closed (the worker is stopping)
            return None

    def keep(self, stop: threading.Event, discard_state: Callable[[], None]) -> None:
        """Check in until ``stop``; after an eviction discard the state and register again. A front that
        refuses this worker for good (another fingerprint) ends the process with SIGTERM, as an operator
        would."""
        while not stop.wait(CHECK_IN_S):
            if self.registered() is not False:
                continue  # still registered, or the front is unreachable for now: ask again later
            log.warning("%s worker: the front evicted slot %d (lease %d); discarding state and registering "
                        "again", self._request.role, self.slot, self.lease)
            discard_state()
            while not stop.is_set():
                try:
                    slot = self.register()
                except RegistrationRefused as exc:
                    if exc.code is grpc.StatusCode.FAILED_PRECONDITION:
                        log.error("the front refuses this worker for good (%s): exiting", exc)
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
                    log.info("registering again failed (%s); retrying", exc)
                    stop.wait(_RETRY_S)
                    continue
                log.info("%s worker registered again into slot %d", self._request.role, slot)
                break

    def start(self, stop: threading.Event, discard_state: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=self.keep, args=(stop, discard_state), name="membership",
                                  daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._channel.close()
