#!/usr/bin/python3
"""An external identity-mapping program for mep (and Globus Connect Server / Globus Compute): a CSV lookup.

Install it root-owned and not writable by others (mep refuses it otherwise),
for example as /usr/local/libexec/mep/csv_mapper.py, mode 0755, with its CSV
file root-owned too, and name both in an ``external_identity_mapping#1.0.0``
document (see example-external-csv.json):

    "command": ["/usr/local/libexec/mep/csv_mapper.py", "--csv", "/etc/mep/accounts.csv"]

The CSV file has a header line and two columns, ``identity`` and ``account``:
``identity`` is either a Globus identity id (a UUID) or a username such as
``alice@example.org`` (compared without regard to case); lines starting with
``#`` are comments. See example-accounts.csv.

Protocol (the caller appends ``-c CONNECTOR -s ENDPOINT``, and ``-a`` for a
whole identity set): ``identity_mapping_input#1.0.0`` on stdin,
``identity_mapping_output#1.0.0`` on stdout with one result per identity that
has a line in the file; without ``-a`` only the first identity is looked up.
Problems go to stderr with exit status 1 (the caller then refuses the
request); an identity without a line is simply not in the result.

Only the Python standard library; runs with whatever python3 the system has.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

INPUT_DATA_TYPE = "identity_mapping_input#1.0.0"
OUTPUT_DATA_TYPE = "identity_mapping_output#1.0.0"


def read_table(path: str) -> dict[str, str]:
    """identity (id, or lower-cased username) -> account."""
    table: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(line for line in handle if not line.lstrip().startswith("#"))
        if rows.fieldnames is None or not {"identity", "account"} <= set(rows.fieldnames):
            raise ValueError(f"{path}: the header must name the columns 'identity' and 'account'")
        for number, row in enumerate(rows, start=2):
            identity, account = (row.get("identity") or "").strip(), (row.get("account") or "").strip()
            if not identity or not account:
                raise ValueError(f"{path}, line {number}: both 'identity' and 'account' are needed")
            key = identity.lower()
            if key in table and table[key] != account:
                raise ValueError(f"{path}, line {number}: {identity!r} is listed twice with different accounts")
            table[key] = account
    return table


def map_identities(table: dict[str, str], identities: list[dict], whole_set: bool) -> list[dict[str, str]]:
    results = []
    for identity in identities if whole_set else identities[:1]:
        for key in (identity.get("id"), identity.get("username")):
            if isinstance(key, str) and key.lower() in table:
                results.append({"id": identity["id"], "output": table[key.lower()]})
                break
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, help="the CSV file of identity,account lines")
    parser.add_argument("-c", dest="connector", help="connector id (appended by the caller)")
    parser.add_argument("-s", dest="endpoint", help="endpoint / storage gateway id (appended by the caller)")
    parser.add_argument("-a", dest="whole_set", action="store_true", help="map every identity of the set")
    options = parser.parse_args(argv)
    try:
        table = read_table(options.csv)
        request = json.load(sys.stdin)
        if not isinstance(request, dict) or request.get("DATA_TYPE") != INPUT_DATA_TYPE:
            raise ValueError(f"stdin is not an {INPUT_DATA_TYPE} document")
        identities = request.get("identities")
        if not isinstance(identities, list) or not all(isinstance(i, dict) and "id" in i for i in identities):
            raise ValueError("'identities' must be a list of identity objects with an 'id'")
    except (OSError, ValueError) as error:
        print(f"csv_mapper: {error}", file=sys.stderr)
        return 1
    results = map_identities(table, identities, options.whole_set)
    json.dump({"DATA_TYPE": OUTPUT_DATA_TYPE, "result": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
