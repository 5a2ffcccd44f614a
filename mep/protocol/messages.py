"""Wire envelopes: plain, typed, versioned data (msgspec Structs), never user payloads.

Every message on every ZeroMQ link is ``[SIGNATURE, header, *payload]`` (a
ROUTER socket sees the peer's routing id in front). The header is one of the
structs below, encoded with msgpack, its ``type`` key naming the command; payload frames are opaque bytes that only
the SDK and the user endpoint ever deserialise. ``docs/protocol.md`` is the
normative description; this module is its executable form.

msgspec rather than pydantic for envelopes: ``benchmarks/throughput.py``
measures it importing in about a third of pydantic's time and encoding plus
decoding a 100-task envelope about three times faster; both matter for cold
start and throughput.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from mep.protocol.user_config import JsonConfig
from mep.root.messages import (  # noqa: F401 - the spawner's own message set, defined with the root process
    PROTOCOL_VERSION,
    AuditStatus,
    AuditTasks,
    EndpointBoot,
    EndpointExited,
    Envelope,
    IdentityResource,
    ProcessStatus,
    RemapGroups,
    RetireEndpoint,
    RouterStopping,
    Runtime,
    Spawned,
    SpawnerStatus,
    SpawnerStatusRequest,
    SpawnRefused,
    SpawnerMessage,
    SpawnRequest,
    TaskAudit,
)

SIGNATURE = b"MEP1"

# Result statuses.
SUCCESS = "success"  # payload: dill of the return value
TASK_ERROR = "error"  # the function raised; payload: dill of the exception (may be unloadable)
FAILED = "failed"  # mep refused or lost the task; no payload; code + message say why
CANCELLED = "cancelled"  # stopped at the submitter's request; no payload
EXPIRED = "expired"  # the result was not collected within the retention period; no payload

# Bounds a decoder enforces while it reads (docs/protocol.md, "Limits"): what a client may list in one request.
MAX_IDS_PER_REQUEST = 100_000  # task ids in a Fetch, Cancel, ResultsAck or TaskQuery; tasks in a Submit
MAX_ID_CHARS = 256  # a task id, function hash, endpoint id or token
MAX_QUERY_STATES = 16

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
IdList = Annotated[list[Id], msgspec.Meta(max_length=MAX_IDS_PER_REQUEST)]


# --- shared pieces ---------------------------------------------------------


class Rejection(msgspec.Struct, forbid_unknown_fields=True):
    """A per-task refusal inside an otherwise accepted batch."""

    task_id: str
    code: str
    message: str


class Result(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One task's outcome. ``payload_frame`` indexes the message's payload frames (-1: none)."""

    task_id: str
    status: str
    payload_frame: int = -1
    code: str = ""
    message: str = ""
    error_type: str = ""
    traceback: str = ""


class TaskRef(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A task inside a batch: frames index the message's payload frames.

    ``fn_frame`` is -1 when the receiver already holds the function ``fn_hash``.
    ``runtime`` indexes ``Tasks.runtimes`` and ``assertion`` ``Tasks.assertions``
    (router -> endpoint only).
    """

    task_id: Id
    fn_hash: Id
    args_frame: int
    fn_frame: int = -1
    runtime: int = 0
    assertion: int = 0
    walltime: float = 0.0  # seconds the task may run once started; 0: no limit


# --- SDK <-> service ---------------------------------------------------------


class Submit(Envelope, tag="SUBMIT"):
    """A batch of tasks for one endpoint under one user endpoint config."""

    token: Id = ""
    request_id: int = 0
    endpoint_id: Id = ""
    user_endpoint_config: JsonConfig = {}
    runtime: Runtime | None = None
    tasks: Annotated[list[TaskRef], msgspec.Meta(max_length=MAX_IDS_PER_REQUEST)] = []


class SubmitAck(Envelope, tag="SUBMIT_ACK"):
    """Sent after the accepted tasks are committed to disk."""

    request_id: int = 0
    accepted: list[str] = []
    rejected: list[Rejection] = []


class Fetch(Envelope, tag="FETCH"):
    """Ask for the stored results of these tasks (after a reconnect, or as a poll)."""

    token: Id = ""
    request_id: int = 0
    task_ids: IdList = []


class Results(Envelope, tag="RESULTS"):
    """Results, pushed by the service or the router, or answering a Fetch.

    ``unknown`` lists task ids the requester may not see (never submitted, or
    submitted by another identity: the two are indistinguishable on purpose).
    """

    request_id: int = 0
    results: list[Result] = []
    unknown: list[str] = []


class ResultsAck(Envelope, tag="RESULTS_ACK"):
    """The receiver has the results durably (client: in hand); the sender may forget them."""

    token: Id = ""
    task_ids: IdList = []


class Cancel(Envelope, tag="CANCEL"):
    """Stop these tasks (client -> service -> router -> endpoint); the token only on the first hop."""

    token: Id = ""
    request_id: int = 0
    task_ids: IdList = []


class CancelAck(Envelope, tag="CANCEL_ACK"):
    """What the service did: ``cancelled`` never reached an endpoint; ``requested`` are being stopped."""

    request_id: int = 0
    cancelled: list[str] = []
    requested: list[str] = []
    finished: list[str] = []
    unknown: list[str] = []


class TaskQuery(Envelope, tag="TASK_QUERY"):
    """List the caller's own tasks: by id, or filtered by endpoint, state and submission time."""

    token: Id = ""
    request_id: int = 0
    task_ids: IdList = []
    endpoint_id: Id = ""
    states: Annotated[list[str], msgspec.Meta(max_length=MAX_QUERY_STATES)] = []
    since: float = 0.0
    limit: int = 1000


class TaskInfo(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A task's lifecycle as the service recorded it (times are Unix seconds; 0: not yet)."""

    task_id: str
    endpoint_id: str
    state: str
    received_at: float
    code: str = ""
    message: str = ""
    attempts: int = 0
    dispatched_at: float = 0.0
    started_at: float = 0.0
    completed_at: float = 0.0
    collected: bool = False


class TaskList(Envelope, tag="TASK_LIST"):
    request_id: int = 0
    tasks: list[TaskInfo] = []


class StatusRequest(Envelope, tag="STATUS"):
    token: Id = ""
    request_id: int = 0
    endpoint_id: str = ""


class StatusReply(Envelope, tag="STATUS_REPLY"):
    request_id: int = 0
    processes: list[ProcessStatus] = []
    endpoint_online: bool = False


class Error(Envelope, tag="ERROR"):
    """A whole request was refused (bad token, malformed message, unknown endpoint)."""

    request_id: int = 0
    code: str = ""
    message: str = ""


# --- service <-> manager router ---------------------------------------------


class TaskGroup(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Who submitted a set of tasks, with which config and runtime.

    ``identity_assertion`` is the service's signed statement of all this
    (``mep.protocol.assertions``), checked by the spawner and the user
    endpoint so neither need trust the router.
    """

    submitter_id: str
    identities: list[IdentityResource]
    user_endpoint_config: JsonConfig
    runtime: Runtime
    task_ids: list[str]
    identity_assertion: str = ""


class Register(Envelope, tag="REGISTER"):
    endpoint_id: str = ""
    mep_version: str = ""


class Registered(Envelope, tag="REGISTERED"):
    heartbeat_interval: float = 10.0


class Unregister(Envelope, tag="UNREGISTER"):
    """The manager is stopping: dispatch nothing more; what it had goes back to waiting."""


class Dispatch(Envelope, tag="DISPATCH"):
    tasks: list[TaskRef] = []
    groups: list[TaskGroup] = []


class DispatchAck(Envelope, tag="DISPATCH_ACK"):
    """``returned``: tasks the router does not hold (it lacked their function body): waiting again, uncharged."""

    accepted: list[str] = []
    rejected: list[Rejection] = []
    returned: list[str] = []


class Credit(Envelope, tag="CREDIT"):
    """Flow control: how much work the sender has room for (docs/protocol.md, "Credit").

    Router -> service: ``tasks`` and ``payload_bytes`` are cumulative since the
    last REGISTERED (the service may have sent that many in all); ``full``
    names submitters to send no more tasks of for now; ``forget`` names
    function bodies the router dropped. Endpoint -> router: ``tasks`` is how
    many tasks the endpoint may hold at once (workers plus a small prefetch).
    """

    tasks: int = 0
    payload_bytes: int = 0
    full: list[str] = []
    forget: list[str] = []


class Heartbeat(Envelope, tag="HEARTBEAT"):
    processes: list[ProcessStatus] = []


class Started(Envelope, tag="STARTED"):
    """These tasks are now running on a worker (endpoint -> router -> service)."""

    task_ids: list[str] = []


class LostTask(msgspec.Struct, forbid_unknown_fields=True):
    """``attempted``: the endpoint had the task (it may have started it); counts toward its attempts."""

    task_id: str
    attempted: bool
    reason: str


class TasksLost(Envelope, tag="TASKS_LOST"):
    """The endpoint holding these tasks died; the service retries or fails each (router -> service)."""

    lost: list[LostTask] = []


# --- manager router <-> user endpoint ---------------------------------------


class Ready(Envelope, tag="READY"):
    endpoint_id: str = ""
    pid: int = 0


class Tasks(Envelope, tag="TASKS"):
    """Tasks for one endpoint, with the runtimes of the clients that submitted them and their groups' assertions."""

    tasks: list[TaskRef] = []
    runtimes: list[Runtime] = []
    assertions: list[str] = []


class IdleExit(Envelope, tag="IDLE_EXIT"):
    """The endpoint has been idle and asks to exit; the router answers Shutdown or ignores it."""


class Shutdown(Envelope, tag="SHUTDOWN"):
    reason: str = ""


Header = (
    Submit
    | SubmitAck
    | Fetch
    | Results
    | ResultsAck
    | Cancel
    | CancelAck
    | TaskQuery
    | TaskList
    | Started
    | TasksLost
    | StatusRequest
    | StatusReply
    | Error
    | Register
    | Unregister
    | Registered
    | Dispatch
    | DispatchAck
    | Credit
    | Heartbeat
    | Ready
    | Tasks
    | IdleExit
    | Shutdown
    | SpawnerMessage
)
