"""``Client``: look after tasks already submitted — from this process or one long gone.

Submit from a laptop, close the lid, and the next morning::

    client = Client()                                   # MEP_SERVICE, MEP_SERVICE_KEY, MEP_TOKEN
    for task in client.list_tasks(states=["succeeded"]):
        print(task.task_id, client.get_result(task.task_id))

Each call is one request to the service and its reply. Results stay on the
service until you ``acknowledge`` them or its retention period passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mep.errors import MepError, ProtocolError
from mep.protocol.messages import (
    Cancel,
    CancelAck,
    Fetch,
    Results,
    ResultsAck,
    TaskInfo,
    TaskList,
    TaskQuery,
)
from mep.sdk.connection import ServiceSettings, request
from mep.sdk.display import html_table, text_table, when
from mep.sdk.large_results import payload_of
from mep.sdk.endpoint_info import EndpointDescription, fetch_description
from mep.sdk.results import outcome

TASK_COLUMNS = ("task id", "state", "attempts", "submitted", "completed", "message")


class TaskPendingError(MepError):
    """The task has not finished yet; ``state`` says where it is."""

    def __init__(self, task_id: str, state: str) -> None:
        super().__init__(f"task {task_id} has not finished yet (state: {state})")
        self.state = state


@dataclass(frozen=True)
class TaskOutcome:
    """A finished task: ``value`` on success, otherwise ``exception``."""

    task_id: str
    value: Any = None
    exception: BaseException | None = None

    def result(self) -> Any:
        if self.exception is not None:
            raise self.exception
        return self.value


class Tasks(list[TaskInfo]):
    """``Client.list_tasks``'s answer: a list of ``TaskInfo`` that prints as a table (HTML in Jupyter)."""

    def _rows(self) -> list[tuple[object, ...]]:
        return [(task.task_id, task.state, task.attempts, when(task.received_at), when(task.completed_at),
                 task.message.splitlines()[0] if task.message else task.waiting_reason) for task in self]

    def __repr__(self) -> str:
        return text_table(TASK_COLUMNS, self._rows()) if self else "Tasks([])"

    def _repr_html_(self) -> str:
        return html_table(f"{len(self)} mep task(s)", TASK_COLUMNS, self._rows())


class Client:
    def __init__(self, *, service: str | None = None, service_key: str | None = None, token: str | None = None,
                 timeout: float = 30.0, read_results_locally: bool = True) -> None:
        """``read_results_locally=False``: fetch large results through the service even where their file is
        readable here (docs/user.md, "Large results")."""
        self._settings = ServiceSettings.resolve(service, service_key, token)
        self.timeout = timeout
        self.read_results_locally = read_results_locally
        self._request_ids = 0

    def _ask(self, header: Any, preceded_by: Sequence[Any] = ()) -> tuple[Any, list[bytes]]:
        self._request_ids += 1
        header.request_id = self._request_ids
        header.token = self._settings.token
        return request(self._settings, header, self.timeout, preceded_by)

    def endpoint_info(self, endpoint_id: str) -> EndpointDescription:
        """What the endpoint accepts in ``user_endpoint_config`` (the admin's schema: each option's type, default
        and description), what its template does, and whether it is online (since when not)."""
        self._request_ids += 1
        return fetch_description(self._settings, endpoint_id, self.timeout, self._request_ids)

    def get_task(self, task_id: str) -> TaskInfo:
        """One task's lifecycle: state, attempts, timestamps, why it failed if it did, and while it is
        unfinished why it waits (``waiting_reason``: endpoint offline since ..., endpoint starting,
        queued behind N tasks)."""
        tasks = self.list_tasks(task_ids=[task_id])
        if not tasks:
            raise MepError(f"the service knows no task {task_id} of yours")
        return tasks[0]

    def list_tasks(self, *, task_ids: Sequence[str] = (), endpoint_id: str = "", states: Iterable[str] = (),
                   since: float = 0.0, limit: int = 1000) -> Tasks:
        """Your tasks, newest first; ``states`` among waiting, dispatched, running, succeeded, failed,
        cancelled, expired; ``since`` a Unix time of submission."""
        query = TaskQuery(task_ids=list(task_ids), endpoint_id=endpoint_id, states=list(states), since=since,
                          limit=limit, reasons=True)
        try:
            reply, _ = self._ask(query)
        except ProtocolError:  # an older service refuses the field ``reasons``; ask as it understands
            query.reasons = False
            reply, _ = self._ask(query)
        assert isinstance(reply, TaskList)
        return Tasks(reply.tasks)

    def get_batch_results(self, task_ids: Sequence[str]) -> dict[str, TaskOutcome]:
        """Outcomes of the finished tasks among ``task_ids`` (unfinished ones are left out)."""
        reply, payloads = self._ask(Fetch(task_ids=list(task_ids)))
        assert isinstance(reply, Results)
        if reply.unknown:
            raise MepError(f"the service knows no task(s) {', '.join(reply.unknown)} of yours")
        found = {}
        for result in reply.results:
            try:
                payload = payload_of(result, payloads[result.payload_frame] if result.payload_frame != -1 else None,
                                     self._settings, read_locally=self.read_results_locally, timeout=self.timeout)
            except MepError as exc:
                found[result.task_id] = TaskOutcome(result.task_id, None, exc)
                continue
            value, error = outcome(result, payload)
            found[result.task_id] = TaskOutcome(result.task_id, value, error)
        return found

    def get_result(self, task_id: str) -> Any:
        """The task's return value; its exception is raised; ``TaskPendingError`` if it isn't done."""
        found = self.get_batch_results([task_id])
        if task_id not in found:
            raise TaskPendingError(task_id, self.get_task(task_id).state)
        return found[task_id].result()

    def acknowledge(self, task_ids: Sequence[str]) -> None:
        """You have these results: the service may delete their bytes now."""
        self._ask(TaskQuery(limit=1), preceded_by=[ResultsAck(token=self._settings.token, task_ids=list(task_ids))])

    def cancel(self, task_ids: Sequence[str]) -> CancelAck:
        """Cancel tasks: queued ones never start, running ones are stopped on the endpoint."""
        reply, _ = self._ask(Cancel(task_ids=list(task_ids)))
        assert isinstance(reply, CancelAck)
        return reply
