"""Evaluating the admin's identity-mapping file, unprivileged: the helper root starts for each mapping step.

``python -I -m mep.mapping`` (``__main__``) runs as ``identity_mapping_user``
after root's checked privilege drop; ``engine`` evaluates the documents
(expression rules and external programs, ``external``). Root's side, what it
sends and how it checks the answer, is ``mep.root.identity``.
"""
