"""The researcher's side: ``Executor`` and the dill serialisation it shares with the endpoint."""
