"""The run's one kernel: the clients nbclient makes for it, the engine that records it in
the saved notebooks, and the stop of its Spark before it is shut down.

:func:`imagepca.runner.run_notebooks` executes every notebook of a run in one kernel; this
module holds what it does to that kernel beside papermill and nbclient.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import suppress
from queue import Empty

from jupyter_client.asynchronous import AsyncKernelClient

STOP_SPARK_CODE = "from imagepca.session import stop_spark\nstop_spark()"
# How long a new client waits for its kernel_info request's idle status on IOPub before it
# asks again: a subscription made just before the request may miss it (ZeroMQ's "slow
# joiner"); jupyter_client waits as long.
IOPUB_CHECK_S = 0.2


class PromptKernelClient(AsyncKernelClient):
    """jupyter_client's asynchronous client, ready as soon as its kernel has answered.

    nbclient makes a client per notebook and waits for it to be ready. jupyter_client's own
    wait ends by reading IOPub until 0.2 s pass without a message: 0.2 s of every notebook
    of a run (notebooks 02 and 03 included), spent waiting for nothing. This client sends
    ``kernel_info`` until the reply arrives on the shell channel and the request's ``idle``
    status on IOPub, which shows IOPub connected too, and is ready then. What else IOPub
    holds answers other requests, which nbclient skips by their parent's id.
    """

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        while True:
            request = self.kernel_info()
            try:
                reply = await _reply(self.get_shell_msg, request, timeout=1)
                self._handle_kernel_info_reply(reply)  # the kernel's protocol version
                await _reply(self.get_iopub_msg, request, timeout=IOPUB_CHECK_S, state="idle")
                return
            except Empty:
                pass
            if not await self.is_alive():
                raise RuntimeError("Kernel died before replying to kernel_info")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kernel didn't respond in {timeout:.0f} seconds")


KERNEL_RECORDING_ENGINE = "imagepca"


def recording_engine() -> str:
    """papermill's nbclient engine, also naming in the notebook it saves the kernel that
    runs it: papermill keeps the source's ``python3`` kernelspec, and a copy run by
    sparkmagic's kernel would reopen (in JupyterHub, say) in a local Python kernel without
    the cluster. Registered under the returned name."""
    from papermill.engines import NBClientEngine, papermill_engines

    class KernelRecordingEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            spec = kwargs["km"].kernel_spec
            nb_man.nb.metadata["kernelspec"] = {
                "name": kernel_name,
                "display_name": spec.display_name,
                "language": spec.language,
            }
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(KERNEL_RECORDING_ENGINE, KernelRecordingEngine)
    return KERNEL_RECORDING_ENGINE


def stopping_clients(kernel_manager) -> Callable[[], None]:
    """A function that stops every client made from ``kernel_manager`` from now on.

    nbclient makes a client per notebook and stops it only with a kernel manager of its
    own. Left running, a client's ZeroMQ sockets reconnect to the ended kernel's ports every
    0.1 s for as long as this process lives, and greet whatever binds a port next: in a test
    process, a JVM's result server took the greeting for its handshake (CANNOT_OPEN_SOCKET).
    """
    made = []
    make = kernel_manager.client

    def client(**kwargs):
        made.append(make(**kwargs))
        return made[-1]

    kernel_manager.client = client

    def stop() -> None:
        for each in made:
            with suppress(Exception):
                each.stop_channels()

    return stop


async def stop_kernel_spark(kernel_manager) -> bool:
    """Stop the kernel's Spark (session and JVM) before the kernel is shut down; see
    :func:`imagepca.session.stop_spark`. Whether it stopped: best effort, the kernel
    shutdown follows anyway."""
    client = None
    try:
        if not await kernel_manager.is_alive():
            return False
        # The shell channel alone: its replies say whether the kernel is free (a kernel
        # still running a timed-out cell answers nothing within 30 s) and whether the code
        # raised. Waiting for the kernel's IOPub stream as well (wait_for_ready,
        # execute_interactive) cost 0.2 s, the quiet period jupyter_client's wait_for_ready
        # lets pass.
        client = kernel_manager.client()
        client.start_channels(iopub=False, stdin=False, hb=False, control=False)
        await _reply(client.get_shell_msg, client.kernel_info(), timeout=30)
        request = client.execute(STOP_SPARK_CODE, silent=True, store_history=False)
        reply = await _reply(client.get_shell_msg, request, timeout=120)
    except Exception as error:  # a dead or busy kernel: its shutdown still ends it
        problem = f"{type(error).__name__}: {error}"
    else:
        if reply["content"]["status"] == "ok":
            return True
        problem = reply["content"].get("evalue", "")
    finally:
        if client is not None:
            client.stop_channels()
    logging.getLogger(__name__).warning("could not stop the kernel's Spark: %s", problem)
    return False


async def _reply(get_msg, request: str, timeout: float, state: str | None = None) -> dict:
    """The message answering ``request`` (with that execution ``state``, for a status on
    IOPub); raises ``queue.Empty`` after ``timeout`` s. Other messages are dropped."""
    deadline = time.monotonic() + timeout
    while True:
        message = await get_msg(timeout=max(0.0, deadline - time.monotonic()))
        if message["parent_header"].get("msg_id") != request:
            continue
        if state is None or message["content"].get("execution_state") == state:
            return message
