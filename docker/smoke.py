#!/usr/bin/env python3
"""The client side of docker/ci-smoke and docker/ci-cluster: a real AMQP client (pika,
as RabbitMQ's own tutorials use) that publishes persistent messages with publisher
confirms, records which ones the broker confirmed, and later checks that every one of
them is still there.

Subcommands (each prints one line saying what it saw and exits non-zero on failure):
  declare URL QUEUE                 declare QUEUE (durable)
  publish URL QUEUE FILE COUNT      publish COUNT messages, append confirmed ids to FILE
  publish-until-closed URL QUEUE FILE
                                    publish until the broker goes away (docker kill)
  publish-until-stopped URL QUEUE FILE STOPFILE
                                    publish until STOPFILE exists, through nacks and
                                    lost connections (connecting again), appending
                                    confirmed ids to FILE
  check URL QUEUE FILE              every id in FILE is in QUEUE (read, then requeued)
  drain URL QUEUE FILE              consume and ack everything in QUEUE; every id in
                                    FILE must be among it
  refused URL                       logging in is refused with 403 ACCESS_REFUSED
  connects URL                      logging in works
  await-close URL FILE              stay connected until the broker closes the
                                    connection; write its reply code and text to FILE

With --quorum anywhere among the arguments, QUEUE is declared as a quorum queue
(x-queue-type: quorum), as it must be declared again with the same arguments.
Duplicates (an id found more than once) are allowed and counted: a publish whose
confirm was lost in a failover may be stored twice.
"""

import os
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


# The arguments QUEUE is declared with (--quorum sets x-queue-type).
QUEUE_ARGUMENTS = {}


def declare(ch, queue):
    ch.queue_declare(queue, durable=True, arguments=QUEUE_ARGUMENTS or None)


def declare_only(url, queue):
    conn = connect(url)
    declare(conn.channel(), queue)
    conn.close()
    print(f"declare: '{queue}' declared with {QUEUE_ARGUMENTS or 'no arguments'}")
    return 0


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


def publish_until_stopped(url, queue, path, stop_path, reconnect_for=60.0):
    """Publishes persistent messages with confirms, one at a time, until STOPFILE
    exists; appends each confirmed id to FILE as soon as its confirm arrives. A nack or
    a return leaves the id unconfirmed and goes on; a lost channel or connection (its
    publish unconfirmed too) is opened again, for up to `reconnect_for` seconds."""
    i = next_id(path)
    counts = {"confirmed": 0, "nacked": 0, "returned": 0, "lost": 0, "reconnects": 0}
    conn = None
    with open(path, "a") as out:
        while not os.path.exists(stop_path):
            if conn is None or conn.is_closed:
                if conn is not None:
                    counts["reconnects"] += 1
                conn = connect(url, wait=reconnect_for)
                ch = conn.channel()
                declare(ch, queue)
                ch.confirm_delivery()
            elif ch.is_closed:
                ch = conn.channel()
                ch.confirm_delivery()
            props = pika.BasicProperties(delivery_mode=2, message_id=str(uuid.uuid4()))
            try:
                ch.basic_publish("", queue, str(i).encode(), props, mandatory=True)
                out.write(f"{i}\n")
                out.flush()
                counts["confirmed"] += 1
            except pika.exceptions.NackError:
                counts["nacked"] += 1
            except pika.exceptions.UnroutableError:
                counts["returned"] += 1
            except (pika.exceptions.AMQPError, OSError):
                counts["lost"] += 1
                if conn.is_open:
                    try:
                        conn.close()
                    except (pika.exceptions.AMQPError, OSError):
                        pass
            i += 1
    if conn is not None and conn.is_open:
        conn.close()
    print("publish-until-stopped: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0 if counts["confirmed"] > 0 else 1


def read_ids(path):
    with open(path) as f:
        return {int(line) for line in f if line.strip()}


def report(command, expected, seen, queue):
    """Prints what was found of the confirmed ids; returns the exit code."""
    found = set(seen)
    missing = sorted(expected - found)
    duplicates = sum(seen.values()) - len(found)
    unconfirmed = len(found - expected)
    print(
        f"{command}: {len(expected)} confirmed, {sum(seen.values())} in '{queue}' "
        f"({duplicates} duplicates, {unconfirmed} never confirmed), {len(missing)} missing"
    )
    if missing:
        print(f"{command}: missing ids (first 20): {missing[:20]}")
        return 1
    return 0


def drain(url, queue, path):
    """Takes every message out of QUEUE (basic.get, acked), then checks that every
    confirmed id was among them."""
    expected = read_ids(path)
    conn = connect(url)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, passive=True)
    seen = {}
    taken = 0
    last_unacked = None
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        seen[int(body)] = seen.get(int(body), 0) + 1
        taken += 1
        last_unacked = method.delivery_tag
        if taken % 100 == 0:
            ch.basic_ack(last_unacked, multiple=True)
            last_unacked = None
    if last_unacked is not None:
        ch.basic_ack(last_unacked, multiple=True)
    # Closing waits for the broker's close-ok, which it sends after the acks.
    conn.close()
    return report("drain", expected, seen, queue)


def check(url, queue, path):
    """Reads every message of QUEUE without acking (they are requeued when the
    connection closes) and checks that every confirmed id is among them."""
    expected = read_ids(path)
    conn = connect(url)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, passive=True)
    seen = {}
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        seen[int(body)] = seen.get(int(body), 0) + 1
    conn.close()
    return report("check", expected, seen, queue)


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
    if "--quorum" in argv:
        argv = [a for a in argv if a != "--quorum"]
        QUEUE_ARGUMENTS["x-queue-type"] = "quorum"
    commands = {
        "declare": lambda a: declare_only(a[0], a[1]),
        "publish": lambda a: publish(a[0], a[1], a[2], int(a[3])),
        "publish-until-closed": lambda a: publish(a[0], a[1], a[2], None),
        "publish-until-stopped": lambda a: publish_until_stopped(a[0], a[1], a[2], a[3]),
        "check": lambda a: check(a[0], a[1], a[2]),
        "drain": lambda a: drain(a[0], a[1], a[2]),
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
