"""mep: send Python functions to a cluster; each runs as its submitter's own Unix account.

The researcher-facing API lives here (``mep.Executor``, ``mep.MappingError``,
listed in ``mep.exports``); everything else is in subpackages, one job each:
``sdk`` (Executor, serialisation), ``service`` (durable broker), ``manager``
(unprivileged router), ``root`` (the root spawner), ``endpoint`` (runs tasks
as the user), ``protocol`` (wire envelopes), ``config`` (models, templates),
``cli`` (the ``mep`` command).
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: the root process imports mep (its package) without the SDK or mep.errors
    import importlib

    exports = importlib.import_module("mep.exports")
    return exports.__all__ if name == "__all__" else exports.export(name)
