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
    EndpointBoot,
    EndpointExited,
    Envelope,
    IdentityResource,
    ProcessStatus,
    RemapGroups,
    RetireEndpoint,
    RouterStopping,
    Spawned,
    SpawnerStatus,
    SpawnerStatusRequest,
    SpawnRefused,
    SpawnerMessage,
    SpawnRequest,
)

SIGNATURE = b"MEP1"


class Runtime(msgspec.Struct, forbid_unknown_fields=True):
    """The submitting client's interpreter, so the endpoint can detect mismatches."""

    python: str
    dill: str
    mep: str
    platform: str


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
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # the most one ChunkRequest may ask for (the SDK asks for 1 MiB)
MAX_UPLOAD_BYTES = 1 << 40  # the largest arguments one upload may declare (the service's quota is smaller)
MAX_SCHEMA_CHARS = 64 * 1024  # the admin's options schema, as JSON text (docs/protocol.md, "Limits")
MAX_DESCRIPTION_CHARS = 4096  # a template's description, or why an endpoint has no schema to show
MAX_STARTING_GROUPS = 10_000  # groups a router reports starting at once (one per user endpoint it starts)

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
Description = Annotated[str, msgspec.Meta(max_length=MAX_DESCRIPTION_CHARS)]
IdList = Annotated[list[Id], msgspec.Meta(max_length=MAX_IDS_PER_REQUEST)]
MAX_RESOURCE_KEYS = 16
MAX_RESOURCE_AMOUNT = 1 << 31
# A task's resource_specification as Parsl names its keys (num_nodes, ranks_per_node, cores, memory, gpus, ...):
# whole amounts only, so it is plain data every hop can check and none has to interpret.
ResourceSpecification = Annotated[
    dict[Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")],
         Annotated[int, msgspec.Meta(ge=0, lt=MAX_RESOURCE_AMOUNT)]],
    msgspec.Meta(max_length=MAX_RESOURCE_KEYS),
]


# --- shared pieces ---------------------------------------------------------


class Rejection(msgspec.Struct, forbid_unknown_fields=True):
    """A per-task refusal inside an otherwise accepted batch."""

    task_id: str
    code: str
    message: str


class LargeResult(msgspec.Struct, forbid_unknown_fields=True):
    """Where a payload above the endpoint's threshold was kept instead of travelling inline.

    The user endpoint ``endpoint_id`` wrote it, as ``account``, to ``path`` on
    its host (mode 0600); the SDK reads it there or asks for it in chunks
    (``ChunkRequest``). docs/protocol.md, "Large results".
    """

    path: Annotated[str, msgspec.Meta(max_length=4096)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    endpoint_id: Id
    account: Id


class LargeArgs(msgspec.Struct, forbid_unknown_fields=True):
    """A task's serialised arguments, uploaded to the service ahead of its SUBMIT (``Upload``) and fetched by
    the endpoint the task is sent to (``ChunkRequest``) instead of travelling inline. docs/protocol.md, "Large
    arguments"."""

    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_UPLOAD_BYTES)]


class Result(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One task's outcome. ``payload_frame`` indexes the message's payload frames (-1: none).

    ``large``: the payload is in a file on the endpoint's host instead (no payload frame).
    """

    task_id: str
    status: str
    payload_frame: int = -1
    code: str = ""
    message: str = ""
    error_type: str = ""
    traceback: str = ""
    large: LargeResult | None = None


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
    resources: ResourceSpecification = {}  # the task's resource_specification; the endpoint checks its limits
    large_args: LargeArgs | None = None  # the arguments were uploaded (``args_frame`` then names an empty frame)


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
    ``started`` (user endpoint -> router only): tasks a worker has taken since
    the endpoint's last report, as a ``STARTED`` would say, carried here so a
    loop turn with both sends one message.
    """

    request_id: int = 0
    results: list[Result] = []
    unknown: list[str] = []
    started: list[str] = []


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


class ChunkRequest(Envelope, tag="CHUNK_REQUEST"):
    """Bytes ``[offset, offset + length)`` of the large result of one of the caller's tasks.

    From a user endpoint (relayed by its router, which checks the task is in flight there): bytes of the
    task's uploaded arguments (``TaskRef.large_args``), answered by ``Chunk`` the same way.
    """

    token: Id = ""
    request_id: int = 0
    task_id: Id = ""
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    length: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_BYTES)] = 1


class Chunk(Envelope, tag="CHUNK"):
    """Endpoint -> router -> service -> client: the bytes read, as one payload frame, or ``code`` and ``message``.

    ``fetch_id`` names the read on the service <-> endpoint hops, ``request_id`` the client's request.
    A frame shorter than asked for ends the file.
    """

    request_id: int = 0
    fetch_id: int = 0
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    code: str = ""
    message: str = ""


class Upload(Envelope, tag="UPLOAD"):
    """Client -> service: the bytes of an upload (its one payload frame) from ``offset`` on.

    An upload is a task's serialised arguments, named by their SHA-256 and total ``size``; the service
    appends a chunk that starts where what it holds ends, and answers every chunk with ``UploadAck``.
    """

    token: Id = ""
    request_id: int = 0
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")] = "0" * 64
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_UPLOAD_BYTES)] = 1
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class UploadAck(Envelope, tag="UPLOAD_ACK"):
    """``received``: how many bytes of the upload are on the service's disk (fsynced); ``size`` when complete.

    Less than the chunk's ``offset``: a chunk before it was lost; send again from ``received``.
    """

    request_id: int = 0
    offset: int = 0
    received: int = 0


class TaskQuery(Envelope, tag="TASK_QUERY"):
    """List the caller's own tasks: by id, or filtered by endpoint, state and submission time."""

    token: Id = ""
    request_id: int = 0
    task_ids: IdList = []
    endpoint_id: Id = ""
    states: Annotated[list[str], msgspec.Meta(max_length=MAX_QUERY_STATES)] = []
    since: float = 0.0
    limit: int = 1000
    reasons: bool = False  # fill in ``TaskInfo.waiting_reason`` (an older client can't read that field)


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
    waiting_reason: str = ""  # why an unfinished task waits, when the query asked for reasons


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


class EndpointOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What an endpoint accepts in ``user_endpoint_config``, as its router read it at start.

    ``schema`` is the admin's JSON Schema as text (checked to be a JSON object by the service);
    ``schema_path`` names it in messages; ``problem`` says why there is no schema ("" when there is).
    """

    schema: Annotated[str, msgspec.Meta(max_length=MAX_SCHEMA_CHARS)] = ""
    schema_path: Description = ""
    template_description: Description = ""
    problem: Description = ""


class EndpointInfoRequest(Envelope, tag="ENDPOINT_INFO"):
    """What may I pass this endpoint, and is it online? Any authenticated identity may ask."""

    token: Id = ""
    request_id: int = 0
    endpoint_id: Id = ""


class EndpointInfo(Envelope, tag="ENDPOINT_INFO_REPLY"):
    """``offline_since``: Unix time its manager went away (0: online, or never connected: ``ever_online``)."""

    request_id: int = 0
    endpoint_id: str = ""
    online: bool = False
    offline_since: float = 0.0
    ever_online: bool = False
    options: EndpointOptions | None = None  # None: its manager has not described it (an older mep)


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


class Describe(Envelope, tag="DESCRIBE"):
    """Router -> service after each REGISTERED: what the endpoint accepts, for ``ENDPOINT_INFO``."""

    options: EndpointOptions = msgspec.field(default_factory=EndpointOptions)


class StartingGroup(msgspec.Struct, forbid_unknown_fields=True):
    """A (submitter, config) whose user endpoint is being started; the config as SHA-256 of its canonical JSON."""

    submitter_id: Id
    config_sha256: Id


class Starting(Envelope, tag="STARTING"):
    """Router -> service: every group whose user endpoint is starting now (the whole set; empty: none)."""

    groups: Annotated[list[StartingGroup], msgspec.Meta(max_length=MAX_STARTING_GROUPS)] = []


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
    many tasks the endpoint may hold at once (workers plus a prefetch).
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


class ChunkRead(Envelope, tag="CHUNK_READ"):
    """Service -> router -> user endpoint: read part of a large result file (answered by ``Chunk``)."""

    fetch_id: int = 0
    large: LargeResult | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    length: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_BYTES)] = 1


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
    | ChunkRequest
    | Chunk
    | Upload
    | UploadAck
    | ChunkRead
    | Started
    | TasksLost
    | StatusRequest
    | StatusReply
    | EndpointInfoRequest
    | EndpointInfo
    | Error
    | Register
    | Describe
    | Starting
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
