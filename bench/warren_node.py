"""Start, stop and measure Warren nodes for the bench scripts (bench/recovery,
bench/backlog-publish, bench/ab, bench/compare), which have no .py suffix and so cannot
import each other."""

import os
import signal
import socket
import subprocess
import time


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def start(binary, data, port):
    env = dict(os.environ, WARREN_PORT=str(port), WARREN_DATA_DIR=data,
               WARREN_LISTEN_ADDRESSES="127.0.0.1", WARREN_MANAGEMENT_PORT="0",
               WARREN_PROMETHEUS_PORT="0")
    env.setdefault("RUST_LOG", "warn")
    log = open(os.path.join(data, "warren.log"), "a")
    started = time.time()
    proc = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"warren exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, time.time() - started
        except OSError:
            time.sleep(0.02)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_nodes(binary, data, port, size, preexec_fn=None):
    """Starts a node, or a cluster of `size` nodes on the loopback addresses
    127.0.1.1-`size` (node i's data in `data`/n<i>), and waits until each listens and,
    for a cluster, the metadata group has a leader (declares need it). Returns the
    processes and the first node's host."""
    hosts = [f"127.0.1.{i + 1}" for i in range(size)] if size > 1 else ["127.0.0.1"]
    names = ",".join(f"n{i + 1}@{h}" for i, h in enumerate(hosts))
    procs = []
    for i, host in enumerate(hosts):
        node_data = os.path.join(data, f"n{i + 1}")
        os.makedirs(node_data)
        env = dict(os.environ, WARREN_PORT=str(port), WARREN_DATA_DIR=node_data,
                   WARREN_LISTEN_ADDRESSES=host, WARREN_MANAGEMENT_PORT="0",
                   WARREN_PROMETHEUS_PORT="0")
        env.setdefault("RUST_LOG", "warn")
        if size > 1:
            env.update(WARREN_NODE_NAME=f"n{i + 1}@{host}", WARREN_CLUSTER_NODES=names,
                       WARREN_CLUSTER_SECRET="bench",
                       RUST_LOG=env["RUST_LOG"] + ",warren::cluster::meta=info")
        log_file = open(os.path.join(node_data, "warren.log"), "w")
        procs.append(subprocess.Popen([binary], env=env, stdout=log_file,
                                      stderr=subprocess.STDOUT, preexec_fn=preexec_fn))
    for host, proc in zip(hosts, procs):
        wait_listening(proc, host, port, 30)
    if size > 1:
        first_log = os.path.join(data, "n1", "warren.log")
        deadline = time.time() + 30
        while "metadata leader is" not in open(first_log).read():
            if time.time() > deadline:
                raise RuntimeError("the bench cluster elected no metadata leader")
            time.sleep(0.2)
    return procs, hosts[0]


def wait_listening(proc, host, port, timeout):
    """Waits until `proc` accepts connections on `host`:`port`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def stop_all(procs):
    """Stops every process of `procs` (SIGTERM, then SIGKILL after 20 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
