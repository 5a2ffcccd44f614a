"""``mep.progress(futures)``: a progress bar (tqdm: a notebook widget in Jupyter, text in a terminal).

::

    futures = [executor.submit(simulate, seed) for seed in range(1000)]
    mep.progress(futures)          # returns when all are done; Ctrl-C stops watching, not the tasks

The bar counts finished tasks; beside it, how many are in each state
(succeeded, failed, cancelled, and for those not done what they wait for).
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterable

REFRESH_SECONDS = 0.5


def state_counts(futures: Iterable[concurrent.futures.Future]) -> Counter[str]:
    """How many futures are in each state, in the words the bar shows."""
    counts: Counter[str] = Counter()
    for future in futures:
        counts[_state(future)] += 1
    return counts


def _state(future: concurrent.futures.Future) -> str:
    if future.cancelled():
        return "cancelled"
    if future.done():
        return "failed" if future.exception(timeout=0) is not None else "succeeded"
    waiting_for = getattr(future, "waiting_for", "")  # a TaskFuture says more than "pending"
    if waiting_for.startswith("queued"):
        return "queued"
    if waiting_for.startswith("sent"):
        return "sent"
    return "waiting"


def progress(futures: Iterable[concurrent.futures.Future], *, description: str = "tasks",
             **tqdm_options: object) -> list[concurrent.futures.Future]:
    """Show a bar until every future is done and return them; ``tqdm_options`` go to ``tqdm`` as they are."""
    from tqdm.auto import tqdm  # only when a bar is wanted: tqdm chooses a widget or text here

    futures = list(futures)
    pending = {future for future in futures if not future.done()}
    with tqdm(total=len(futures), initial=len(futures) - len(pending), desc=description, unit="task",
              **tqdm_options) as bar:
        while True:
            bar.set_postfix(state_counts(futures), refresh=True)
            if not pending:
                return futures
            # a timed wait: the counts refresh, and Ctrl-C is handled between waits
            finished, pending = concurrent.futures.wait(pending, timeout=REFRESH_SECONDS,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
            bar.update(len(finished))
