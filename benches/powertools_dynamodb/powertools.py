#!/usr/bin/env python3
"""The Powertools side of issue 24's DynamoDB comparison.

An `idempotent_function` on `DynamoDBPersistenceLayer` (defaults: no local cache, no payload
validation) against a table on a local DynamoDB server reached through count_proxy.py. It
runs N first calls (misses: the body runs) and then N replays of the same keys (hits: the
stored result comes back), and reads the proxy's counts around each phase, so the round
trips per call are counted at the server side, by operation (X-Amz-Target).

Wall time per call is reported against a baseline measured in the same run: a raw GetItem of
one existing item from the same boto3 client, through the same proxy. The ratio is context
only; moto is not DynamoDB.

Usage: powertools.py --endpoint http://127.0.0.1:8001 --table T [--n 200] [--max-seconds 60]

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


def counts(endpoint):
    with urllib.request.urlopen(endpoint + "/__counts", timeout=5) as r:
        return json.loads(r.read())


def delta(before, after, calls):
    """Requests per call by operation between two snapshots of the proxy's counts."""
    out = {}
    for op in sorted(set(before) | set(after)):
        d = after.get(op, 0) - before.get(op, 0)
        if d:
            out[op] = d / calls
    return out


def timed(n, max_seconds, f):
    """Runs f(i) for i in 0..n, stopping early after max_seconds; (calls made, ns per call)."""
    start = time.perf_counter_ns()
    deadline = time.monotonic() + max_seconds
    done = 0
    for i in range(n):
        f(i)
        done += 1
        if time.monotonic() > deadline:
            break
    return done, (time.perf_counter_ns() - start) / done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True, help="the counting proxy, http://127.0.0.1:PORT")
    ap.add_argument("--table", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="bound per phase")
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

    c0 = counts(args.endpoint)
    n_base, base_ns = timed(args.n, args.max_seconds, get)
    c1 = counts(args.endpoint)
    runs_before = body_runs[0]
    n_miss, miss_ns = timed(args.n, args.max_seconds, lambda i: charge(order=order("k", i)))
    c2 = counts(args.endpoint)
    miss_runs = body_runs[0] - runs_before
    results = []
    n_hit, hit_ns = timed(n_miss, args.max_seconds, lambda i: results.append(charge(order=order("k", i))))
    c3 = counts(args.endpoint)
    hit_runs = body_runs[0] - runs_before - miss_runs

    # Every replay must be the first call's result, and no replay may run the body.
    for i, r in enumerate(results):
        if r != {"order_id": order("k", i)["order_id"], "charged": i}:
            sys.exit(f"replay {i} returned {r!r}")
    if miss_runs != n_miss or hit_runs != 0:
        sys.exit(f"body ran {miss_runs} times on {n_miss} misses and {hit_runs} on {n_hit} hits")

    out = {
        "side": "powertools",
        "versions": {
            "aws-lambda-powertools": aws_lambda_powertools.__version__
            if hasattr(aws_lambda_powertools, "__version__")
            else "",
            "boto3": boto3.__version__,
            "python": sys.version.split()[0],
        },
        "baseline": {"name": "boto3 GetItem", "calls": n_base, "ns_per_call": base_ns,
                     "requests_per_call": delta(c0, c1, n_base)},
        "miss": {"calls": n_miss, "ns_per_call": miss_ns, "requests_per_call": delta(c1, c2, n_miss)},
        "hit": {"calls": n_hit, "ns_per_call": hit_ns, "requests_per_call": delta(c2, c3, n_hit)},
    }
    print(json.dumps(out))
    print(
        f"powertools: miss {out['miss']['requests_per_call']} {miss_ns/1e3:.0f} us, "
        f"hit {out['hit']['requests_per_call']} {hit_ns/1e3:.0f} us, "
        f"GetItem {base_ns/1e3:.0f} us",
        file=sys.stderr,
    )


if __name__ == "__main__":
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    # Outside Lambda there is no context to register: Powertools warns on every miss and
    # writes no in-progress expiry (the record stays INPROGRESS until `expiration`).
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")
    main()
