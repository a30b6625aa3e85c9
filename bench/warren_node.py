"""Start, stop and measure one Warren node for the bench scripts (bench/recovery,
bench/backlog-publish), which have no .py suffix and so cannot import each other."""

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
