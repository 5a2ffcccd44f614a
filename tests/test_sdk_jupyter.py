"""Ctrl-C in Jupyter: one "interrupt the kernel" ends a cell waiting in result(), map or a with block.

A real IPython kernel (ipykernel, driven by jupyter_client as JupyterLab drives
it) runs the researcher's cells; the service is down, so every wait would last
for ever. Before the fix, a cell leaving a ``with`` block stayed busy after the
interrupt: ``__exit__`` waited for acknowledgements that could not come.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import zmq
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

SETUP = """
import mep

def square(x=0):
    return x * x

executor = mep.Executor("00000000-0000-4000-8000-000000000000", service={address!r}, token="t",
                        service_key={key!r})
"""


@pytest.fixture
def kernel() -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    manager, client = start_new_kernel(kernel_name="python3", cwd="/")
    try:
        yield manager, client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def run_cell(client: BlockingKernelClient, code: str, *, interrupt: KernelManager | None = None) -> dict:
    """Execute ``code``; with ``interrupt``, interrupt the kernel once when the cell has printed "waiting"."""
    msg_id = client.execute(code)
    if interrupt is not None:
        while True:  # an interrupt before the cell's own code runs would be the kernel's, not the cell's
            message = client.get_iopub_msg(timeout=60)
            if (message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "stream"
                    and "waiting" in message["content"]["text"]):
                break
        time.sleep(0.5)  # let it block in the wait
        interrupt.interrupt_kernel()
    while True:
        reply = client.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


@pytest.mark.parametrize("cell", [
    "executor.submit(square, 3).result()",
    "list(executor.map(square, range(3)))",
    "with executor:\n    executor.submit(square, 3).result()",
])
def test_one_interrupt_ends_a_cell_waiting_for_a_service_that_is_down(kernel, cell: str) -> None:
    manager, client = kernel
    with socket.socket() as probe:  # an address nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    setup = run_cell(client, SETUP.format(address=address, key=zmq.curve_keypair()[0].decode()))
    assert setup["status"] == "ok", setup
    interrupted = run_cell(client, "print('waiting', flush=True)\n" + cell, interrupt=manager)
    assert (interrupted["status"], interrupted["ename"]) == ("error", "KeyboardInterrupt")
    after = run_cell(client, "print(repr(executor))")  # the kernel goes on, and so does the Executor
    assert after["status"] == "ok"
