#!/usr/bin/env python3
"""The client side of docker/ci-smoke: a real AMQP client (pika, as RabbitMQ's own
tutorials use) that publishes persistent messages with publisher confirms, records
which ones the broker confirmed, and later checks that every one of them is still
there.

Subcommands (each prints one line saying what it saw and exits non-zero on failure):
  publish URL QUEUE FILE COUNT      publish COUNT messages, append confirmed ids to FILE
  publish-until-closed URL QUEUE FILE
                                    publish until the broker goes away (docker kill)
  check URL QUEUE FILE              every id in FILE is in QUEUE (read, then requeued)
  refused URL                       logging in is refused with 403 ACCESS_REFUSED
  connects URL                      logging in works
  await-close URL FILE              stay connected until the broker closes the
                                    connection; write its reply code and text to FILE
"""

import sys
import time
import uuid

import pika
import pika.exceptions


# What pika raises when the broker refuses the login (403 ACCESS_REFUSED in the handshake).
REFUSED = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
)


def connect(url, wait=60.0):
    """Connects, retrying while the node starts (recovery, a restart)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return pika.BlockingConnection(pika.URLParameters(url))
        except REFUSED:
            raise
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def declare(ch, queue):
    ch.queue_declare(queue, durable=True)


def next_id(path):
    """Ids continue after those already in FILE, so that every run's ids are new."""
    try:
        with open(path) as f:
            ids = [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        ids = []
    return max(ids, default=-1) + 1


def publish(url, queue, path, count=None):
    """Publishes persistent messages with confirms; appends each confirmed id to FILE as
    soon as its confirm arrives. With count None, goes on until the connection drops."""
    first = next_id(path)
    confirmed = 0
    conn = connect(url)
    ch = conn.channel()
    declare(ch, queue)
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, message_id=str(uuid.uuid4()))
    with open(path, "a") as out:
        i = first
        try:
            while count is None or i < first + count:
                # Raises if the broker nacks or returns the message.
                ch.basic_publish("", queue, str(i).encode(), props, mandatory=True)
                out.write(f"{i}\n")
                out.flush()
                confirmed += 1
                i += 1
        except (pika.exceptions.AMQPError, OSError) as e:
            if count is not None:
                raise
            print(f"publish: connection ended after {confirmed} confirms ({type(e).__name__})")
            return 0 if confirmed > 0 else 1
    conn.close()
    print(f"publish: {confirmed} messages confirmed (ids {first}..{first + confirmed - 1})")
    return 0


def check(url, queue, path):
    """Reads every message of QUEUE without acking (they are requeued when the
    connection closes) and checks that every confirmed id is among them."""
    with open(path) as f:
        expected = {int(line) for line in f if line.strip()}
    conn = connect(url)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, passive=True)
    found = set()
    total = 0
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        total += 1
        found.add(int(body))
    conn.close()
    missing = sorted(expected - found)
    print(f"check: {len(expected)} confirmed, {total} in '{queue}', {len(missing)} missing")
    if missing:
        print(f"check: missing ids (first 20): {missing[:20]}")
        return 1
    return 0


def refused(url):
    try:
        conn = connect(url, wait=30.0)
    except REFUSED as e:
        if "403" not in str(e) or "ACCESS_REFUSED" not in str(e):
            print(f"refused: refused, but not with 403 ACCESS_REFUSED: {e!r}")
            return 1
        print(f"refused: {type(e).__name__}: {e}")
        return 0
    conn.close()
    print("refused: the login was accepted, it should have been refused")
    return 1


def connects(url):
    conn = connect(url, wait=30.0)
    conn.channel()
    conn.close()
    print("connects: logged in")
    return 0


def await_close(url, path):
    conn = connect(url)
    conn.channel()
    with open(path + ".ready", "w") as f:
        f.write("connected\n")
    try:
        while True:
            conn.process_data_events(time_limit=1)
    except pika.exceptions.ConnectionClosedByBroker as e:
        with open(path, "w") as f:
            f.write(f"{e.reply_code} {e.reply_text}\n")
        print(f"await-close: closed by the broker: {e.reply_code} {e.reply_text}")
        return 0
    except (pika.exceptions.AMQPError, OSError) as e:
        with open(path, "w") as f:
            f.write(f"dropped {type(e).__name__} {e}\n")
        print(f"await-close: connection dropped without connection.close: {e!r}")
        return 1


def main(argv):
    commands = {
        "publish": lambda a: publish(a[0], a[1], a[2], int(a[3])),
        "publish-until-closed": lambda a: publish(a[0], a[1], a[2], None),
        "check": lambda a: check(a[0], a[1], a[2]),
        "refused": lambda a: refused(a[0]),
        "connects": lambda a: connects(a[0]),
        "await-close": lambda a: await_close(a[0], a[1]),
    }
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[1]](argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
