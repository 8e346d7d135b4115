#!/usr/bin/env python3
"""The Powertools side of issue 24's DynamoDB comparison.

An `idempotent_function` on `DynamoDBPersistenceLayer` (defaults: no local cache, no payload
validation) against a table on a local DynamoDB server reached through count_proxy.py. In 5
rounds it makes raw GetItems (the baseline), first calls of new keys (misses: the body runs)
and replays of those keys (hits: the stored result comes back), and reads the proxy's counts
around each batch, so the round trips per call are counted at the server side, by operation
(X-Amz-Target), with the time the server took to answer them (the proxy's wait on moto).
N calls of each kind in all; it checks that the body ran once per miss, never
on a hit, and that every hit returned the first call's result.

Wall time per call is reported against a baseline measured in the same run: a raw GetItem of
one existing item from the same boto3 client, through the same proxy. The ratio is context
only; moto is not DynamoDB.

Usage: powertools.py --endpoint http://127.0.0.1:8001 --table T [--n 200] [--max-seconds 120]

Prints one JSON object on stdout (the driver's input) and a summary on stderr.
"""

import argparse
import json
import os
import sys
import time
import urllib.request
import uuid
import warnings

import boto3
from botocore.config import Config

import aws_lambda_powertools
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)


def counts(endpoint, what="counts"):
    """The proxy's requests (`counts`) or upstream ns (`times`) so far, by operation."""
    with urllib.request.urlopen(f"{endpoint}/__{what}", timeout=5) as r:
        return json.loads(r.read())


ROUNDS = 5


class Phase:
    """One kind of call: calls made, their total time, and the proxy's counts across them."""

    def __init__(self):
        self.calls = 0
        self.ns = 0
        self.requests = {}
        self.server_ns = 0

    def measure(self, endpoint, keys, f):
        before, before_ns = counts(endpoint), counts(endpoint, "times")
        start = time.perf_counter_ns()
        for i in keys:
            f(i)
        self.ns += time.perf_counter_ns() - start
        after, after_ns = counts(endpoint), counts(endpoint, "times")
        self.server_ns += sum(after_ns.values()) - sum(before_ns.values())
        self.calls += len(keys)
        for op, n in after.items():
            d = n - before.get(op, 0)
            if d:
                self.requests[op] = self.requests.get(op, 0) + d

    def report(self):
        return {
            "calls": self.calls,
            "ns_per_call": self.ns / self.calls,
            "server_ns_per_call": self.server_ns / self.calls,
            "requests_per_call": {op: n / self.calls for op, n in sorted(self.requests.items())},
        }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True, help="the counting proxy, http://127.0.0.1:PORT")
    ap.add_argument("--table", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="bound on the measured rounds")
    args = ap.parse_args()

    client = boto3.client(
        "dynamodb",
        endpoint_url=args.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "max_attempts": 3}),
    )
    existing = client.list_tables()["TableNames"]
    if args.table not in existing:
        client.create_table(
            TableName=args.table,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        client.get_waiter("table_exists").wait(TableName=args.table)

    layer = DynamoDBPersistenceLayer(table_name=args.table, boto3_client=client)
    config = IdempotencyConfig(expires_after_seconds=3600)
    body_runs = [0]

    @idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
    def charge(order: dict) -> dict:
        body_runs[0] += 1
        return {"order_id": order["order_id"], "charged": order["amount"]}

    run = uuid.uuid4().hex[:12]

    def order(phase, i):
        return {"order_id": f"{run}-{phase}-{i}", "amount": i}

    # The baseline's item, and a warm-up of every path (connections, botocore's loaders).
    client.put_item(TableName=args.table, Item={"id": {"S": f"baseline-{run}"}, "v": {"S": "x"}})
    for i in range(5):
        client.get_item(TableName=args.table, Key={"id": {"S": f"baseline-{run}"}})
        charge(order=order("warm", i))
        charge(order=order("warm", i))

    def get(_i):
        client.get_item(TableName=args.table, Key={"id": {"S": f"baseline-{run}"}})

    # ROUNDS rounds of: GetItem (baseline), first calls of new keys, replays of those keys; so
    # that the machine's load moves all three alike. Bounded by --max-seconds overall.
    base, miss, hit = Phase(), Phase(), Phase()
    results = []
    per_round = -(-args.n // ROUNDS)
    deadline = time.monotonic() + args.max_seconds
    for r in range(ROUNDS):
        if time.monotonic() > deadline:
            break
        keys = range(r * per_round, min((r + 1) * per_round, args.n))
        base.measure(args.endpoint, keys, get)
        before = body_runs[0]
        miss.measure(args.endpoint, keys, lambda i: charge(order=order("k", i)))
        if body_runs[0] - before != len(keys):
            sys.exit(f"the body ran {body_runs[0] - before} times on {len(keys)} misses")
        before = body_runs[0]
        hit.measure(args.endpoint, keys, lambda i: results.append(charge(order=order("k", i))))
        if body_runs[0] != before:
            sys.exit(f"the body ran {body_runs[0] - before} times on {len(keys)} hits")

    # Every replay must be the first call's result, and no replay may run the body.
    for i, r in enumerate(results):
        if r != {"order_id": order("k", i)["order_id"], "charged": i}:
            sys.exit(f"replay {i} returned {r!r}")

    out = {
        "side": "powertools",
        "versions": {
            "aws-lambda-powertools": aws_lambda_powertools.__version__
            if hasattr(aws_lambda_powertools, "__version__")
            else "",
            "boto3": boto3.__version__,
            "python": sys.version.split()[0],
        },
        "baseline": {"name": "boto3 GetItem", **base.report()},
        "miss": miss.report(),
        "hit": hit.report(),
    }
    print(json.dumps(out))
    print(
        "powertools: "
        + ", ".join(
            f"{k} {out[k]['requests_per_call']} {out[k]['ns_per_call'] / 1e3:.0f} us"
            for k in ("miss", "hit", "baseline")
        ),
        file=sys.stderr,
    )


if __name__ == "__main__":
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    # Outside Lambda there is no context to register: Powertools warns on every miss and
    # writes no in-progress expiry (the record stays INPROGRESS until `expiration`).
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")
    main()
