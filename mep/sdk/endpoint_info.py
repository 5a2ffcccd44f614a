"""What an endpoint accepts, as a researcher sees it, and the check of options against it before submitting.

``Client.endpoint_info(endpoint_id)`` returns an ``EndpointDescription``: the
admin's schema for ``user_endpoint_config`` (each option with its type,
default and description), the template's description, and whether the
endpoint is online (since when not). It prints as a table, in HTML in Jupyter.

``OptionsCheck`` is the Executor's copy: fetched once per Executor in the
background, it checks each new ``user_endpoint_config`` at ``submit`` with the
endpoint's own code (``mep.config.options``), so a typo fails there with the
message the endpoint would give. When the service is older, the endpoint's
manager has not described it, or the service does not answer in time, options
are checked on the endpoint side only, as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mep.errors import MepError
from mep.protocol.messages import EndpointInfo, EndpointInfoRequest
from mep.sdk.connection import ServiceSettings, request
from mep.sdk.display import html_table, text_table

if TYPE_CHECKING:
    from mep.config.options import OptionsSchema

log = logging.getLogger(__name__)

OPTION_COLUMNS = ("option", "type", "default", "description")
FETCH_TIMEOUT = 10.0  # seconds the Executor's background fetch waits for the service
SUBMIT_WAIT = 5.0  # seconds a submit waits at most for that fetch (once; later submits don't wait)
NO_DEFAULT = "-"


@dataclass(frozen=True)
class EndpointDescription:
    """An endpoint as the service knows it. ``schema`` is None when its manager has not described it."""

    endpoint_id: str
    online: bool
    offline_since: float | None  # Unix time its manager went away; None: online, or not known
    schema: dict[str, Any] | None
    schema_path: str = ""
    template_description: str = ""
    problem: str = ""  # why there is no schema, when there is none
    schema_text: str = field(default="", repr=False)  # the schema as the endpoint reads it

    @classmethod
    def from_reply(cls, reply: EndpointInfo) -> EndpointDescription:
        options = reply.options
        return cls(endpoint_id=reply.endpoint_id, online=reply.online,
                   offline_since=reply.offline_since or None,
                   schema=json.loads(options.schema) if options and options.schema else None,
                   schema_path=options.schema_path if options else "",
                   template_description=options.template_description if options else "",
                   problem=options.problem if options else "its manager has not described this endpoint (an "
                                                           "older mep, or it has not connected yet)",
                   schema_text=options.schema if options else "")

    @property
    def status(self) -> str:
        if self.online:
            return "online"
        if self.offline_since:
            return "offline since " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.offline_since))
        return "offline"

    @property
    def options(self) -> list[tuple[str, str, str, str]]:
        """(name, type, default, description) of each option the schema names, required ones marked."""
        properties = (self.schema or {}).get("properties", {})
        required = set((self.schema or {}).get("required", []))
        rows = []
        for name, spec in properties.items() if isinstance(properties, dict) else ():
            spec = spec if isinstance(spec, dict) else {}
            kind = spec.get("type", "any")
            kind = " or ".join(kind) if isinstance(kind, list) else str(kind)
            if "enum" in spec:
                kind += " (one of " + ", ".join(json.dumps(value) for value in spec["enum"]) + ")"
            default = json.dumps(spec["default"]) if "default" in spec else ("required" if name in required
                                                                              else NO_DEFAULT)
            rows.append((name, kind, default, str(spec.get("description", ""))))
        return rows

    def _summary(self) -> list[tuple[str, str]]:
        rows = [("endpoint", self.endpoint_id), ("status", self.status)]
        if self.template_description:
            rows.append(("template", self.template_description))
        if self.schema is None:
            rows.append(("options", f"not known: {self.problem}" if self.problem else "not known"))
        elif self.schema.get("additionalProperties") is False:
            rows.append(("options", "only those below"))
        return rows

    def __repr__(self) -> str:
        summary = self._summary()
        width = max(len(name) for name, _ in summary)
        text = "\n".join(f"{name.ljust(width)}  {value}" for name, value in summary)
        return text + ("\n\n" + text_table(OPTION_COLUMNS, self.options) if self.options else "")

    def _repr_html_(self) -> str:
        return (html_table("mep endpoint", ("", ""), self._summary())
                + (html_table("user_endpoint_config options", OPTION_COLUMNS, self.options) if self.options else ""))


def fetch_description(settings: ServiceSettings, endpoint_id: str, timeout: float,
                      request_id: int = 1) -> EndpointDescription:
    header = EndpointInfoRequest(token=settings.token, request_id=request_id, endpoint_id=endpoint_id)
    reply, _ = request(settings, header, timeout)
    if not isinstance(reply, EndpointInfo):
        raise MepError(f"the service answered ENDPOINT_INFO with {type(reply).__name__}")
    return EndpointDescription.from_reply(reply)


class OptionsCheck:
    """One Executor's view of its endpoint's schema: fetched in the background, then used at each submit."""

    def __init__(self, settings: ServiceSettings, endpoint_id: str) -> None:
        self._fetched = threading.Event()
        self.description: EndpointDescription | None = None  # set once the service answered ENDPOINT_INFO
        self._schema: OptionsSchema | None = None
        self._checked: set[bytes] = set()  # configs (as frozen at submit) already found valid
        self._lock = threading.Lock()
        self._waited = False  # only the first submit waits for the fetch
        threading.Thread(target=self._fetch, args=(settings, endpoint_id), daemon=True,
                         name=f"mep-endpoint-info-{endpoint_id[:8]}").start()

    def _fetch(self, settings: ServiceSettings, endpoint_id: str) -> None:
        try:
            description = fetch_description(settings, endpoint_id, FETCH_TIMEOUT)
            if description.schema is not None:
                from mep.config.options import OptionsSchema  # jsonschema: imported here, off the submit path

                self._schema = OptionsSchema(description.schema_text, description.schema_path)
            self.description = description
        except MepError as exc:  # an older service, no answer, an unusable schema: the endpoint checks alone
            log.info("options are checked on the endpoint only: endpoint_info is unavailable (%s)", exc)
        except Exception:  # a failed fetch must never fail a submit: the endpoint still checks
            log.exception("options are checked on the endpoint only: endpoint_info failed")
        finally:
            self._fetched.set()

    @property
    def service_describes(self) -> bool:
        """The service answered ENDPOINT_INFO, so it also reads the rest of this protocol revision."""
        return self.description is not None

    def check(self, frozen: bytes, user_config: dict[str, Any]) -> None:
        """Raise the endpoint's own ``ConfigInvalidError`` for options its schema refuses."""
        if frozen in self._checked:
            return
        if not self._waited:  # later submits use the schema once it is there, without waiting for it
            self._fetched.wait(SUBMIT_WAIT)
            self._waited = True
        if self._schema is None:
            return
        self._schema.check(user_config)
        with self._lock:
            self._checked.add(frozen)
